// The tutorial's five code samples (../../../shared/seed), as written, with one change: the base
// URL `https://api.clerk.com` is origin's. CLERK_SECRET_KEY is origin's admin token.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { ADMIN_TOKEN, startOrigin, type Origin } from './origin.ts';

let origin: Origin;
let CLERK_API: string;
before(async () => {
  origin = await startOrigin();
  CLERK_API = origin.baseUrl;
  process.env.CLERK_SECRET_KEY = ADMIN_TOKEN;
});
after(async () => origin.stop());

// ---- Step 1 -------------------------------------------------------------------------------
import fetch from 'node-fetch';

const createApiKey = async (partnerId: string, scopes: string[]) => {
  const response = await fetch(
    `${CLERK_API}/backend.api-keys.create`,
    {
      method: 'POST',
      headers: {
        'Authorization': `Bearer ${process.env.CLERK_SECRET_KEY}`,
        'Content-Type': 'application/json',
      },
      body: JSON.stringify({
        name: `partner-${partnerId}-integration`,
        scopes,
        metadata: {
          partner_id: partnerId,
          created_at: new Date().toISOString(),
        },
      }),
    }
  );
  return response.json();
};

// ---- Step 2 -------------------------------------------------------------------------------
const verifyApiKey = async (submittedKey: string) => {
  const response = await fetch(
    `${CLERK_API}/backend.api-keys.verify`,
    {
      method: 'POST',
      headers: {
        'Authorization': `Bearer ${process.env.CLERK_SECRET_KEY}`,
        'Content-Type': 'application/json',
      },
      body: JSON.stringify({
        key: submittedKey,
      }),
    }
  );
  return response.json();
};

// ---- Step 3 -------------------------------------------------------------------------------
const listApiKeys = async (limit: number = 50) => {
  const response = await fetch(
    `${CLERK_API}/backend.api-keys.list?limit=${limit}`,
    {
      method: 'GET',
      headers: {
        'Authorization': `Bearer ${process.env.CLERK_SECRET_KEY}`,
      },
    }
  );
  return response.json();
};

// ---- Step 4 -------------------------------------------------------------------------------
const revokeApiKey = async (keyId: string) => {
  const response = await fetch(
    `${CLERK_API}/backend.api-keys.revoke`,
    {
      method: 'DELETE',
      headers: {
        'Authorization': `Bearer ${process.env.CLERK_SECRET_KEY}`,
        'Content-Type': 'application/json',
      },
      body: JSON.stringify({
        key_id: keyId,
      }),
    }
  );
  return response.json();
};

// ---- Step 5 -------------------------------------------------------------------------------
const updateApiKey = async (
  keyId: string,
  updates: { scopes?: string[]; metadata?: Record<string, any> }
) => {
  const response = await fetch(
    `${CLERK_API}/backend.api-keys.update`,
    {
      method: 'PATCH',
      headers: {
        'Authorization': `Bearer ${process.env.CLERK_SECRET_KEY}`,
        'Content-Type': 'application/json',
      },
      body: JSON.stringify({
        key_id: keyId,
        ...updates,
      }),
    }
  );
  return response.json();
};

test("the tutorial's example usage runs against origin", async () => {
  // Step 1 example usage.
  const key: any = await createApiKey('acme-corp', [
    'read:orders',
    'read:customers',
    'write:webhooks',
  ]);
  assert.match(key.id, /^key_/);
  assert.equal(key.name, 'partner-acme-corp-integration');
  assert.match(key.key, /^sk_live_/);
  assert.deepEqual([...key.scopes].sort(), ['read:customers', 'read:orders', 'write:webhooks']);
  assert.equal(key.metadata.partner_id, 'acme-corp');
  assert.ok(!Number.isNaN(Date.parse(key.created_at)));

  // Step 2 example usage.
  const partnerProvidedKey = key.key;
  const validation: any = await verifyApiKey(partnerProvidedKey);
  assert.equal(validation.valid && validation.scopes.includes('read:orders'), true);
  assert.equal(validation.id, key.id);
  assert.equal(validation.revoked, false);
  assert.ok(!Number.isNaN(Date.parse(validation.last_used_at)));

  // Step 3 example usage.
  const allKeys: any = await listApiKeys();
  assert.equal(allKeys.total_count, 1);
  assert.equal(allKeys.page, 1);
  assert.equal(allKeys.page_size, 50);
  const revokedOrStale = allKeys.data.filter(
    (key: any) =>
      key.revoked ||
      new Date(key.last_used_at).getTime() <
        Date.now() - 90 * 24 * 60 * 60 * 1000 // 90 days
  );
  assert.equal(revokedOrStale.length, 0, 'just used, not revoked');

  // Step 5 example usage (before step 4: a revoked key cannot be changed).
  const updated: any = await updateApiKey(key.id, {
    scopes: ['read:orders', 'read:customers'], // removed 'write:webhooks'
    metadata: {
      partner_id: 'acme-corp',
      scope_reduced_at: new Date().toISOString(),
      reason: 'security-review',
    },
  });
  assert.deepEqual([...updated.scopes].sort(), ['read:customers', 'read:orders']);
  assert.equal(updated.metadata.reason, 'security-review');
  assert.ok(!Number.isNaN(Date.parse(updated.updated_at)));

  // Step 4 example usage.
  const result: any = await revokeApiKey(key.id);
  assert.equal(result.success, true);
  assert.equal(result.revoked, true);
  assert.equal(result.id, key.id);
  assert.ok(!Number.isNaN(Date.parse(result.revoked_at)));

  // After revocation the partner's key fails verification, with a reason.
  const denied: any = await verifyApiKey(partnerProvidedKey);
  assert.equal(denied.valid, false);
  assert.equal(denied.revoked, true);
  assert.equal(denied.code, 'REVOKED');
  const stale: any = await listApiKeys();
  assert.equal(stale.data.filter((k: any) => k.revoked).length, 1);

  // The sample's failure branch: `result.success` false and `result.error` set.
  const missing: any = await revokeApiKey('key_2lx0y5Z8kQ9pR3mN');
  assert.equal(missing.success, false);
  assert.equal(typeof missing.error.message, 'string');
});
