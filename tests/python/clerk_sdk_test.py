"""Clerk's own Python SDK (`clerk-backend-api`, pinned in requirements.txt) against the real
origin binary, pointed at it with `server_url` and otherwise used as Clerk documents it: every
`api_keys` call, with the SDK's default arguments left as they are. The SDK validates every
answer with its pydantic models and accepts only the status codes of Clerk's document (201 for
create), so an answer that differs in shape or status fails here.

Run by `./dev test` from the virtual environment `./dev setup` makes; by hand:
    ORIGIN_BIN=target/debug/origin tests/python/.venv/bin/python tests/python/clerk_sdk_test.py
It prints TAP, and a closing `# python pass N` / `# python fail N` that `./dev test` counts.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import httpx
from clerk_backend_api import Clerk, models

ADMIN_TOKEN = "python-test-admin-token-eeeeeeeeeeeeeeeeeeeeee"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Origin:
    """The origin binary over a fresh SQLite file, on a port it picks."""

    def __init__(self):
        binary = os.environ.get("ORIGIN_BIN", os.path.join(ROOT, "target", "debug", "origin"))
        self.dir = tempfile.mkdtemp(prefix="latchkey-python-")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "ORIGIN_LISTEN": "127.0.0.1:0",
            "DATABASE_URL": "sqlite://" + os.path.join(self.dir, "latchkey.db"),
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "AUDIT_CHAIN_KEY": "python-test-audit-chain-key-ffffffffffffffff",
            "RUST_LOG": "info",
        }
        self.process = subprocess.Popen(
            [binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        self.log = []
        listening = threading.Event()
        self.address = None

        def read_log():
            for line in self.process.stderr:
                self.log.append(line)
                found = re.search(r"origin listening.*listen=(\S+)", line)
                if found and not listening.is_set():
                    self.address = found.group(1)
                    listening.set()
            listening.set()

        threading.Thread(target=read_log, daemon=True).start()
        if not listening.wait(20) or self.address is None:
            self.stop()
            raise RuntimeError("origin did not start:\n" + "".join(self.log))
        self.base_url = "http://" + self.address

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def error_code(error):
    """The first error code of a Clerk error envelope, from a typed or a generic SDK error."""
    return json.loads(error.body)["errors"][0]["code"]


class ClerkPythonSdk(unittest.TestCase):
    origin = None
    clerk = None

    @classmethod
    def setUpClass(cls):
        cls.origin = Origin()
        # Clerk's SDK paths start at `/api_keys`; its own server URL ends in `/v1`.
        cls.clerk = Clerk(bearer_auth=ADMIN_TOKEN, server_url=cls.origin.base_url + "/v1")

    @classmethod
    def tearDownClass(cls):
        cls.origin.stop()

    def test_create_get_list_update_verify_revoke(self):
        keys = self.clerk.api_keys
        created = keys.create_api_key(
            name="partner-acme-corp-integration",
            subject="acme-corp",
            description="orders sync",
            scopes=["read:orders", "write:webhooks"],
            claims={"partner_id": "acme-corp"},
            created_by="user_42",
            seconds_until_expiration=3600,
        )
        self.assertIsInstance(created, models.CreateAPIKeyResponseBody)
        self.assertRegex(created.id, r"^key_")
        self.assertRegex(created.secret, r"^sk_live_")
        self.assertEqual(created.type, "api_key")
        self.assertEqual(created.subject, "acme-corp")
        self.assertEqual(created.created_by, "user_42")
        self.assertEqual(created.scopes, ["read:orders", "write:webhooks"])
        self.assertEqual(created.claims, {"partner_id": "acme-corp"})
        self.assertEqual(created.expiration - created.created_at, 3_600_000)
        self.assertFalse(created.revoked)
        self.assertFalse(created.expired)

        fetched = keys.get_api_key(api_key_id=created.id)
        self.assertEqual(fetched.name, "partner-acme-corp-integration")
        self.assertEqual(fetched.description, "orders sync")
        # The SDK's model drops fields it does not know: read the answer itself.
        raw = httpx.get(
            f"{self.origin.base_url}/v1/api_keys/{created.id}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        self.assertEqual(raw.status_code, 200)
        self.assertNotIn("secret", raw.json(), "the secret is shown once, at creation")
        self.assertNotIn(created.secret, raw.text)

        verified = keys.verify_api_key(secret=created.secret)
        self.assertEqual(verified.id, created.id)
        self.assertGreaterEqual(verified.last_used_at, created.created_at)

        keys.create_api_key(name="other", subject="globex")
        listed = keys.get_api_keys(subject="acme-corp")
        self.assertEqual(listed.total_count, 1)
        self.assertEqual([k.id for k in listed.data], [created.id])
        # The SDK types limit and offset as floats; they are sent as such.
        paged = keys.get_api_keys(subject="acme-corp", limit=1.0, offset=1.0)
        self.assertEqual((paged.data, paged.total_count), ([], 1))
        found = keys.get_api_keys(subject="acme-corp", query="ACME-CORP")
        self.assertEqual([k.id for k in found.data], [created.id])
        self.assertEqual(keys.get_api_keys(subject="acme-corp", query="globex").total_count, 0)

        updated = keys.update_api_key(
            api_key_id=created.id,
            subject="acme-corp",
            scopes=["read:orders"],
            description="narrowed",
            seconds_until_expiration=7200.5,
        )
        self.assertEqual(updated.scopes, ["read:orders"])
        self.assertEqual(updated.description, "narrowed")
        self.assertEqual(updated.expiration - updated.updated_at, 7_200_500)

        revoked = keys.revoke_api_key(api_key_id=created.id, revocation_reason="rotated")
        self.assertTrue(revoked.revoked)
        self.assertEqual(revoked.revocation_reason, "rotated")
        with self.assertRaises(models.ClerkBaseError) as refused:
            keys.verify_api_key(secret=created.secret)
        self.assertEqual(refused.exception.status_code, 404)
        self.assertEqual(refused.exception.data.errors[0].code, "api_key_revoked")

        # Clerk lists only valid keys unless asked for invalid ones.
        self.assertEqual(keys.get_api_keys(subject="acme-corp").total_count, 0)
        everything = keys.get_api_keys(
            subject="acme-corp", include_invalid=models.IncludeInvalid.TRUE
        )
        self.assertEqual(everything.total_count, 1)
        self.assertTrue(everything.data[0].revoked)

    def test_a_type_of_its_own_is_kept_and_listed_apart(self):
        keys = self.clerk.api_keys
        feed = keys.create_api_key(name="feed", subject="initech", type_="partner_key")
        self.assertEqual(feed.type, "partner_key")
        self.assertEqual(keys.get_api_key(api_key_id=feed.id).type, "partner_key")
        plain = keys.create_api_key(name="plain", subject="initech")
        self.assertEqual(plain.type, "api_key")
        self.assertEqual([k.id for k in keys.get_api_keys(subject="initech").data], [plain.id])
        self.assertEqual(
            [k.id for k in keys.get_api_keys(subject="initech", type_="partner_key").data],
            [feed.id],
        )
        with self.assertRaises(models.ClerkBaseError) as refused:
            keys.create_api_key(name="bad", subject="initech", type_="ab")
        self.assertEqual(refused.exception.status_code, 422)
        self.assertEqual(error_code(refused.exception), "form_param_invalid")

    def test_delete_revokes_the_key_and_hides_it(self):
        keys = self.clerk.api_keys
        key = keys.create_api_key(name="to-delete", subject="umbrella", scopes=["read:orders"])
        deleted = keys.delete_api_key(api_key_id=key.id)
        self.assertEqual((deleted.id, deleted.object), (key.id, "api_key"))
        # The SDK names Clerk's `deleted: true` DELETED; it was sent, not defaulted.
        self.assertIs(deleted.DELETED, True)
        self.assertIn("DELETED", deleted.model_fields_set)
        for call in (keys.get_api_key, keys.delete_api_key):
            with self.assertRaises(models.ClerkBaseError) as gone:
                call(api_key_id=key.id)
            self.assertEqual(gone.exception.status_code, 404)
            self.assertEqual(gone.exception.data.errors[0].code, "resource_not_found")
        listed = keys.get_api_keys(subject="umbrella", include_invalid=models.IncludeInvalid.TRUE)
        self.assertEqual(listed.total_count, 0)
        # The secret's hash stays: it can never verify again.
        with self.assertRaises(models.ClerkBaseError) as refused:
            keys.verify_api_key(secret=key.secret)
        self.assertEqual(refused.exception.data.errors[0].code, "api_key_revoked")

    def test_a_secret_is_never_shown_again(self):
        keys = self.clerk.api_keys
        key = keys.create_api_key(name="secret", subject="hooli")
        with self.assertRaises(models.ClerkBaseError) as refused:
            keys.get_api_key_secret(api_key_id=key.id)
        self.assertEqual(refused.exception.status_code, 404)
        self.assertEqual(refused.exception.data.errors[0].code, "secret_not_stored")
        self.assertNotIn(key.secret, refused.exception.body)
        self.assertEqual(keys.verify_api_key(secret=key.secret).id, key.id, "the key still works")

    def test_errors_carry_clerks_envelope(self):
        keys = self.clerk.api_keys
        with self.assertRaises(models.ClerkBaseError) as refused:
            keys.create_api_key(name="x", subject="s", scopes=["*"])
        self.assertEqual(refused.exception.status_code, 422)
        self.assertEqual(json.loads(refused.exception.body)["errors"][0]["meta"]["param_name"], "scopes")
        with self.assertRaises(models.ClerkBaseError) as missing:
            keys.get_api_key(api_key_id="key_00000000000000000000")
        self.assertEqual(missing.exception.status_code, 404)
        with self.assertRaises(models.ClerkBaseError) as unknown:
            keys.verify_api_key(secret="not-a-key")
        self.assertEqual(unknown.exception.status_code, 404)
        wrong = Clerk(bearer_auth="wrong-token-wrong-token-wrong-token", server_url=self.origin.base_url + "/v1")
        with self.assertRaises(models.ClerkBaseError) as unauthorised:
            wrong.api_keys.get_api_keys(subject="s")
        self.assertEqual(unauthorised.exception.status_code, 401)


class TapResult(unittest.TextTestResult):
    """TAP lines, one per test, with the reason of a failure as comments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.number = 0
        self.passed = 0

    def _line(self, ok, test, detail=None):
        self.number += 1
        print(f"{'ok' if ok else 'not ok'} {self.number} - {test.id()}", flush=True)
        for line in (detail or "").splitlines():
            print(f"# {line}", flush=True)

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1
        self._line(True, test)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._line(False, test, self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        self._line(False, test, self._exc_info_to_string(err, test))


def main():
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(ClerkPythonSdk)
    print(f"1..{suite.countTestCases()}", flush=True)
    started = time.monotonic()
    runner = unittest.TextTestRunner(
        stream=open(os.devnull, "w"), resultclass=TapResult, verbosity=0
    )
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors)
    # A class set-up that failed runs no test: count every test as failed.
    if result.testsRun == 0 or result.passed + failed < suite.countTestCases():
        failed = suite.countTestCases() - result.passed
    print(f"# python pass {result.passed}")
    print(f"# python fail {failed}")
    print(f"# duration_ms {round((time.monotonic() - started) * 1000)}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
