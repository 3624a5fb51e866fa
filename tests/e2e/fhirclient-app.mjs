// A SMART app built on the SMART project's own JavaScript client (npm fhirclient), served
// to a real browser: /launch.html authorizes (discovery, PKCE, state: all fhirclient's
// doing), /callback.html completes the launch and reads the patient in context, then the
// other patient, and reports what it got. The browser is driven by playwright-core through
// the provider's sign-in page and the gateway's consent page.
//
// Environment: GATEWAY, CLIENT_ID, APP_PORT, OTHER_PATIENT, and for the automated run
// LOGIN and CHROMIUM. Without CHROMIUM it only serves the app (for a person's browser:
// deploy/demo.sh), prints "LISTENING <launch page>" and each report as a JSON line.
// With it, it drives the browser itself and prints one JSON line with the report.

import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
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
const appPort = Number(env('APP_PORT'));
const origin = `http://127.0.0.1:${appPort}`;
const require = createRequire(import.meta.url);
const library = readFileSync(require.resolve('fhirclient/build/fhir-client.js'));

const page = (script) =>
  `<!doctype html><html><head><meta charset="utf-8"><script src="/fhir-client.js"></script></head>` +
  `<body><script>${script}</script></body></html>`;
const launch = page(`FHIR.oauth2.authorize(${JSON.stringify({
  iss: gateway,
  clientId: env('CLIENT_ID'),
  scope: 'launch/patient openid fhirUser patient/*.rs',
  redirectUri: `${origin}/callback.html`,
})});`);
const callback = page(`
  const report = (r) => fetch('/report', { method: 'POST', body: JSON.stringify(r) });
  FHIR.oauth2.ready().then(async (client) => {
    const out = { patient: client.patient.id };
    const own = await client.request('Patient/' + client.patient.id);
    out.own = own.resourceType + '/' + own.id;
    try {
      await client.request('Patient/${env('OTHER_PATIENT')}');
      out.other = 'read';
    } catch (e) {
      out.other = e.status || String(e);
    }
    document.body.textContent = JSON.stringify(out);
    await report(out);
  }).catch((e) => report({ error: String(e) }));`);

let done;
let reported = new Promise((r) => (done = r));
const server = createServer((req, res) => {
  const path = new URL(req.url, origin).pathname;
  if (path === '/fhir-client.js') return res.writeHead(200, { 'content-type': 'text/javascript' }).end(library);
  if (path === '/launch.html') return res.writeHead(200, { 'content-type': 'text/html' }).end(launch);
  if (path === '/callback.html') return res.writeHead(200, { 'content-type': 'text/html' }).end(callback);
  if (path === '/report') {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      res.writeHead(204).end();
      done(JSON.parse(body));
    });
    return;
  }
  res.writeHead(404).end();
});
await new Promise((r) => server.listen(appPort, '127.0.0.1', r));

if (!process.env.CHROMIUM) {
  console.log(`LISTENING ${origin}/launch.html`);
  for (;;) {
    console.log(JSON.stringify(await reported));
    reported = new Promise((r) => (done = r));
  }
}

const browser = await chromium.launch({ executablePath: env('CHROMIUM'), args: ['--no-sandbox'] });
let out;
try {
  const tab = await browser.newPage();
  tab.on('console', (m) => console.error('browser:', m.text()));
  await tab.goto(`${origin}/launch.html`);
  await tab.waitForSelector('input[name="login"]', { timeout: 20000 });
  await tab.fill('input[name="login"]', env('LOGIN'));
  await tab.fill('input[name="password"]', 'any');
  await tab.click('button[type="submit"]');
  await tab.waitForSelector('button[value="approve"]', { timeout: 20000 });
  await tab.click('button[value="approve"]');
  out = await Promise.race([
    reported,
    new Promise((_, fail) => setTimeout(() => fail(new Error(`no report; at ${tab.url()}`)), 30000)),
  ]);
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(out));
