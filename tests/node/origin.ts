// Starts the real origin binary over a fresh SQLite file, on a port it picks, for one test file.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const ADMIN_TOKEN = 'node-test-admin-token-cccccccccccccccccccccc';

export interface Origin {
  baseUrl: string;
  stop(): Promise<void>;
}

export async function startOrigin(): Promise<Origin> {
  const bin = process.env.ORIGIN_BIN ?? resolve(import.meta.dirname, '../../target/debug/origin');
  const dir = mkdtempSync(join(tmpdir(), 'latchkey-node-'));
  const child: ChildProcess = spawn(bin, ['serve'], {
    env: {
      ORIGIN_LISTEN: '127.0.0.1:0',
      DATABASE_URL: `sqlite://${join(dir, 'latchkey.db')}`,
      ADMIN_TOKEN,
      AUDIT_CHAIN_KEY: 'node-test-audit-chain-key-dddddddddddddddd',
      RUST_LOG: 'info',
    },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  const baseUrl = await new Promise<string>((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`origin did not start:\n${log}`)), 20_000);
    child.once('exit', (code) => fail(new Error(`origin exited with ${code}:\n${log}`)));
    child.stderr!.on('data', (chunk: Buffer) => {
      log += chunk.toString();
      const m = /origin listening.*listen=(\S+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        ok(`http://${m[1]}`);
      }
    });
  });
  return {
    baseUrl,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((ok) => child.once('exit', ok));
        child.kill('SIGTERM');
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
