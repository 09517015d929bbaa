// Clerk's own backend SDK, pointed at origin with `apiUrl`, used exactly as Clerk documents it.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createClerkClient } from '@clerk/backend';
import { ADMIN_TOKEN, startOrigin, type Origin } from './origin.ts';

let origin: Origin;
let clerk: ReturnType<typeof createClerkClient>;

before(async () => {
  origin = await startOrigin();
  clerk = createClerkClient({ secretKey: ADMIN_TOKEN, apiUrl: origin.baseUrl });
});
after(async () => origin.stop());

test('create, get, list, update, verify and revoke through @clerk/backend', async () => {
  const created = await clerk.apiKeys.create({
    name: 'partner-acme-corp-integration',
    subject: 'acme-corp',
    description: 'orders sync',
    scopes: ['read:orders', 'write:webhooks'],
    claims: { partner_id: 'acme-corp' },
    createdBy: 'user_42',
    secondsUntilExpiration: 3600,
  });
  assert.match(created.id, /^key_/);
  assert.match(created.secret!, /^sk_live_/);
  assert.equal(created.type, 'api_key');
  assert.equal(created.subject, 'acme-corp');
  assert.equal(created.createdBy, 'user_42');
  assert.deepEqual(created.scopes, ['read:orders', 'write:webhooks']);
  assert.deepEqual(created.claims, { partner_id: 'acme-corp' });
  assert.equal(created.expiration! - created.createdAt, 3_600_000);

  const fetched = await clerk.apiKeys.get(created.id);
  assert.equal(fetched.name, 'partner-acme-corp-integration');
  assert.equal(fetched.secret, undefined, 'the secret is shown once, at creation');

  const verified = await clerk.apiKeys.verify(created.secret!);
  assert.equal(verified.id, created.id);
  assert.equal(verified.revoked, false);
  assert.ok(verified.lastUsedAt! >= created.createdAt);

  await clerk.apiKeys.create({ name: 'other', subject: 'globex' });
  const listed = await clerk.apiKeys.list({ subject: 'acme-corp' });
  assert.equal(listed.totalCount, 1);
  assert.equal(listed.data[0].id, created.id);
  const paged = await clerk.apiKeys.list({ subject: 'acme-corp', limit: 1, offset: 1 });
  assert.equal(paged.data.length, 0);

  const updated = await clerk.apiKeys.update({
    apiKeyId: created.id,
    subject: 'acme-corp',
    scopes: ['read:orders'],
    description: 'narrowed',
  });
  assert.deepEqual(updated.scopes, ['read:orders']);
  assert.equal(updated.description, 'narrowed');

  const revoked = await clerk.apiKeys.revoke({ apiKeyId: created.id, revocationReason: 'rotated' });
  assert.equal(revoked.revoked, true);
  assert.equal(revoked.revocationReason, 'rotated');

  // Clerk's SDK throws for a revoked key, with Clerk's error shape.
  await assert.rejects(clerk.apiKeys.verify(created.secret!), (err: any) => {
    assert.equal(err.status, 404);
    assert.equal(err.errors[0].code, 'api_key_revoked');
    return true;
  });
  // By default Clerk lists only valid keys; includeInvalid shows revoked ones.
  assert.equal((await clerk.apiKeys.list({ subject: 'acme-corp' })).totalCount, 0);
  assert.equal((await clerk.apiKeys.list({ subject: 'acme-corp', includeInvalid: true })).totalCount, 1);
});

test('errors come back as ClerkAPIResponseError with code and param name', async () => {
  await assert.rejects(clerk.apiKeys.create({ name: 'x', subject: 's', scopes: ['*'] }), (err: any) => {
    assert.equal(err.status, 422);
    assert.equal(err.errors[0].code, 'form_param_invalid');
    assert.equal(err.errors[0].meta.paramName, 'scopes');
    return true;
  });
  await assert.rejects(clerk.apiKeys.get('key_00000000000000000000'), (err: any) => err.status === 404);
  await assert.rejects(clerk.apiKeys.verify('not-a-key'), (err: any) => err.status === 404);
  const wrong = createClerkClient({ secretKey: 'wrong-token-wrong-token-wrong-token', apiUrl: origin.baseUrl });
  await assert.rejects(wrong.apiKeys.list({ subject: 's' }), (err: any) => err.status === 401);
});

// Calls the SDK does not have (disable, roll, a leak report) are plain REST calls; what the SDK
// does have must understand their results.
async function rest(method: string, path: string, body: unknown, status = 200): Promise<any> {
  const response = await fetch(`${origin.baseUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  assert.equal(response.status, status, await response.clone().text());
  return response.json();
}

test('disabled, rolled and leaked keys as @clerk/backend sees them', async () => {
  const key = await clerk.apiKeys.create({ name: 'lifecycle', subject: 'initech', scopes: ['read:orders'] });
  await rest('PATCH', `/v1/api_keys/${key.id}`, { disabled: true });
  await assert.rejects(clerk.apiKeys.verify(key.secret!), (err: any) => {
    assert.equal(err.status, 404);
    assert.equal(err.errors[0].code, 'api_key_disabled');
    return true;
  });
  await rest('PATCH', `/v1/api_keys/${key.id}`, { disabled: false });
  assert.equal((await clerk.apiKeys.verify(key.secret!)).id, key.id);

  // A roll with a grace period: both secrets verify, and the SDK reads both key objects.
  // A roll creates a key: 201, as create answers.
  const rolled = await rest('POST', `/v1/api_keys/${key.id}/roll`, { grace_period_seconds: 600 }, 201);
  assert.equal((await clerk.apiKeys.verify(key.secret!)).id, key.id);
  const successor = await clerk.apiKeys.verify(rolled.secret);
  assert.equal(successor.id, rolled.id);
  assert.deepEqual(successor.scopes, ['read:orders']);
  assert.ok((await clerk.apiKeys.get(key.id)).expiration! > Date.now());

  // Reported as leaked: revoked, and the SDK says so.
  await rest('POST', `/v1/api_keys/${rolled.id}/leak`, { source: 'a pastebin' });
  const leaked = await clerk.apiKeys.get(rolled.id);
  assert.equal(leaked.revoked, true);
  assert.equal(leaked.revocationReason, 'leaked: a pastebin');
  await assert.rejects(clerk.apiKeys.verify(rolled.secret), (err: any) => err.errors[0].code === 'api_key_revoked');
});

test('delete: the key is revoked, gone from get and list, and a second delete is a 404', async () => {
  const key = await clerk.apiKeys.create({ name: 'to-delete', subject: 'umbrella', scopes: ['read:orders'] });
  const deleted = await clerk.apiKeys.delete(key.id);
  assert.equal(deleted.id, key.id);
  assert.equal(deleted.object, 'api_key');
  assert.equal(deleted.deleted, true);
  await assert.rejects(clerk.apiKeys.get(key.id), (err: any) => err.status === 404);
  await assert.rejects(clerk.apiKeys.delete(key.id), (err: any) => err.status === 404);
  const listed = await clerk.apiKeys.list({ subject: 'umbrella', includeInvalid: true });
  assert.equal(listed.totalCount, 0);
  // Its secret can never verify again.
  await assert.rejects(clerk.apiKeys.verify(key.secret!), (err: any) => err.errors[0].code === 'api_key_revoked');
});
