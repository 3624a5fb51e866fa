// A SMART Backend Services client written independently of the gateway, with npm `jose`:
// it makes its own RS384 and ES384 keys, authenticates with signed client assertions
// (RFC 7523), gets access tokens, and reads FHIR data with them.
//
//   node backend-client.mjs keys KEYFILE          # writes private JWKs, prints "JWKS <public jwks>"
//   node backend-client.mjs run KEYFILE TOKEN_URL AUD CLIENT_ID SCOPE FHIR_URL
//                                                   # prints "RESULT <json>" per algorithm
// AUD is the token endpoint as the gateway publishes it (its public URL), TOKEN_URL where
// this client reaches it.

import { readFileSync, writeFileSync } from 'node:fs';
import { randomUUID } from 'node:crypto';
import { SignJWT, exportJWK, generateKeyPair, importJWK } from 'jose';

const [mode, keyFile, ...rest] = process.argv.slice(2);
const ALGS = ['RS384', 'ES384'];

if (mode === 'keys') {
  const priv = {};
  const pub = [];
  for (const alg of ALGS) {
    const { publicKey, privateKey } = await generateKeyPair(alg, { extractable: true });
    const kid = `${alg.toLowerCase()}-${randomUUID().slice(0, 8)}`;
    priv[alg] = { ...(await exportJWK(privateKey)), kid, alg };
    pub.push({ ...(await exportJWK(publicKey)), kid, alg, use: 'sig' });
  }
  writeFileSync(keyFile, JSON.stringify(priv), { mode: 0o600 });
  console.log(`JWKS ${JSON.stringify({ keys: pub })}`);
} else if (mode === 'run') {
  const [tokenUrl, aud, clientId, scope, fhirUrl] = rest;
  const keys = JSON.parse(readFileSync(keyFile, 'utf8'));
  for (const alg of ALGS) {
    const jwk = keys[alg];
    const key = await importJWK(jwk, alg);
    const assertion = await new SignJWT({})
      .setProtectedHeader({ alg, kid: jwk.kid, typ: 'JWT' })
      .setIssuer(clientId)
      .setSubject(clientId)
      .setAudience(aud)
      .setJti(randomUUID())
      .setIssuedAt()
      .setExpirationTime('4m')
      .sign(key);
    const tokenResp = await fetch(tokenUrl, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'client_credentials',
        scope,
        client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
        client_assertion: assertion,
      }),
    });
    const token = await tokenResp.json();
    let fhir = null;
    if (token.access_token) {
      const r = await fetch(fhirUrl, { headers: { authorization: `Bearer ${token.access_token}` } });
      fhir = { status: r.status, body: await r.json() };
    }
    console.log(`RESULT ${JSON.stringify({ alg, tokenStatus: tokenResp.status, token, fhir })}`);
  }
} else {
  console.error('usage: backend-client.mjs keys KEYFILE | run KEYFILE TOKEN_URL AUD CLIENT_ID SCOPE FHIR_URL');
  process.exit(2);
}
