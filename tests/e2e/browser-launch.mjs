// A SMART standalone patient launch in a real browser (headless Chromium, driven by
// playwright-core): the app sends the browser to the gateway's /auth/authorize; the user
// signs in on the provider's own page and approves on the gateway's consent page; the app
// (this script, serving its redirect URI) trades the code and reads FHIR data through the
// gateway. Prints one JSON line with what it saw.
//
// Environment: GATEWAY (public FHIR base), CLIENT_ID, APP_PORT, LOGIN (provider account),
// OTHER_PATIENT, CHROMIUM (the browser's path).

import { createServer } from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`missing ${name}`);
    process.exit(2);
  }
  return v;
};
const gateway = env('GATEWAY');
const clientId = env('CLIENT_ID');
const appPort = Number(env('APP_PORT'));
const redirectUri = `http://127.0.0.1:${appPort}/callback`;
const b64url = (buf) => buf.toString('base64url');

// The app's redirect URI: resolves with the query the browser brings back.
let arrived;
const callback = new Promise((resolve) => (arrived = resolve));
const app = createServer((req, res) => {
  const url = new URL(req.url, redirectUri);
  res.writeHead(200, { 'content-type': 'text/html' }).end('<!doctype html><p>back in the app</p>');
  if (url.pathname === '/callback') arrived(Object.fromEntries(url.searchParams));
});
await new Promise((r) => app.listen(appPort, '127.0.0.1', r));

const verifier = b64url(randomBytes(32));
const challenge = b64url(createHash('sha256').update(verifier).digest());
const state = b64url(randomBytes(16));
const authorize = new URL(`${gateway}/auth/authorize`);
for (const [k, v] of Object.entries({
  response_type: 'code',
  client_id: clientId,
  redirect_uri: redirectUri,
  scope: 'launch/patient openid fhirUser offline_access patient/*.rs',
  state,
  aud: gateway,
  code_challenge: challenge,
  code_challenge_method: 'S256',
})) {
  authorize.searchParams.set(k, v);
}

const out = {};
const browser = await chromium.launch({ executablePath: env('CHROMIUM'), args: ['--no-sandbox'] });
try {
  const page = await browser.newPage();
  page.on('response', (r) => {
    if (r.url().startsWith(`${gateway}/auth/callback`)) {
      const h = r.headers();
      out.consent_headers = {
        csp: h['content-security-policy'],
        frame: h['x-frame-options'],
        cache: h['cache-control'],
      };
    }
  });
  page.on('console', (m) => console.error('browser:', m.text()));
  await page.goto(authorize.toString());
  // The provider's sign-in page (oidc-provider's own form).
  await page.fill('input[name="login"]', env('LOGIN'));
  await page.fill('input[name="password"]', 'any');
  await page.click('button[type="submit"]');
  await page.waitForURL((u) => u.toString().startsWith(`${gateway}/auth/callback`), { timeout: 20000 });
  // The gateway's consent page.
  out.consent_title = await page.title();
  out.consent_scopes = await page.$$eval('input[name="scope"]', (els) => els.map((e) => e.value));
  out.consent_labelled = await page.$$eval('input[name="scope"]', (els) => els.every((e) => e.closest('label')));
  // The user unchecks offline access, then allows.
  await page.uncheck('input[name="scope"][value="offline_access"]');
  await page.click('button[value="approve"]');
  const query = await Promise.race([
    callback,
    new Promise((_, fail) => setTimeout(() => fail(new Error(`no redirect to the app; at ${page.url()}`)), 20000)),
  ]);
  out.state_matches = query.state === state;
  out.error = query.error ?? null;
  if (query.code) {
    const token = await fetch(`${gateway}/auth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'authorization_code',
        code: query.code,
        redirect_uri: redirectUri,
        code_verifier: verifier,
        client_id: clientId,
      }),
    });
    out.token_status = token.status;
    out.token_cache_control = token.headers.get('cache-control');
    const t = await token.json();
    out.token_type = t.token_type;
    out.patient = t.patient;
    out.scope = t.scope;
    out.has_id_token = typeof t.id_token === 'string';
    out.has_refresh_token = typeof t.refresh_token === 'string';
    const read = async (path) =>
      (await fetch(`${gateway}${path}`, { headers: { authorization: `Bearer ${t.access_token}` } })).status;
    out.own_patient = await read(`/Patient/${t.patient}`);
    out.other_patient = await read(`/Patient/${env('OTHER_PATIENT')}`);
  }
} finally {
  await browser.close();
  app.close();
}
console.log(JSON.stringify(out));
