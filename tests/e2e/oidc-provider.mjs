// A real OAuth 2 / OpenID Connect server (npm oidc-provider, OpenID certified) for the
// end-to-end tests, configured like a SMART Backend Services authorization server:
//
// - client_credentials grant, clients authenticate with private_key_jwt;
// - resource indicators (RFC 8707): RESOURCE_JWT gets JWT access tokens (RFC 9068),
//   RESOURCE_OPAQUE gets opaque tokens for introspection;
// - SMART-style scopes, and a `patient` claim in every token (extraTokenClaims);
// - token introspection, for the gateway's own confidential client.
//
// Environment: CLIENT_JWKS (the test client's public JWKS, JSON), GATEWAY_SECRET,
// RESOURCE_JWT, RESOURCE_OPAQUE. Prints "LISTENING <issuer>" once it accepts requests.

import net from 'node:net';
import Provider from 'oidc-provider';

const SCOPES = 'system/*.rs system/Patient.r patient/*.rs launch/patient';

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const required = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`missing ${name}`);
    process.exit(2);
  }
  return v;
};

const clientJwks = JSON.parse(required('CLIENT_JWKS'));
const gatewaySecret = required('GATEWAY_SECRET');
const resourceJwt = required('RESOURCE_JWT');
const resourceOpaque = required('RESOURCE_OPAQUE');

const port = await freePort();
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'backend-app',
      token_endpoint_auth_method: 'private_key_jwt',
      token_endpoint_auth_signing_alg: 'ES384',
      jwks: clientJwks,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      scope: SCOPES,
    },
    {
      // The gateway itself, for introspection only.
      client_id: 'smartgate',
      client_secret: gatewaySecret,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [],
      response_types: [],
      redirect_uris: [],
    },
  ],
  scopes: ['openid', ...SCOPES.split(' ')],
  // SMART Backend Services: client assertions are RS384 or ES384.
  enabledJWA: {
    clientAuthSigningAlgValues: ['RS384', 'ES384', 'RS256', 'ES256'],
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resourceJwt,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator) => {
        if (resourceIndicator === resourceJwt) {
          return {
            scope: SCOPES,
            audience: resourceJwt,
            accessTokenFormat: 'jwt',
            accessTokenTTL: 300,
            jwt: { sign: { alg: 'ES256' } },
          };
        }
        if (resourceIndicator === resourceOpaque) {
          return { scope: SCOPES, audience: resourceOpaque, accessTokenFormat: 'opaque', accessTokenTTL: 300 };
        }
        throw new Error(`unknown resource ${resourceIndicator}`);
      },
    },
  },
  extraTokenClaims: async () => ({ patient: '123', fhirUser: 'Practitioner/7' }),
  // ES256 for access tokens, RS256 for the (unused) ID tokens.
  jwks: { keys: await generateKeys() },
});

provider.on('server_error', (ctx, err) => console.error('server_error', err));

async function generateKeys() {
  const { generateKeyPair, exportJWK } = await import('jose');
  const keys = [];
  for (const [alg, kid] of [['RS256', 'rs-1'], ['ES256', 'es-1']]) {
    const { privateKey } = await generateKeyPair(alg, { extractable: true });
    keys.push({ ...(await exportJWK(privateKey)), kid, alg, use: 'sig' });
  }
  return keys;
}

provider.listen(port, '127.0.0.1', () => {
  console.log(`LISTENING ${issuer}`);
});
