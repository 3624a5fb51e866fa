// A real OpenID Connect provider (npm oidc-provider) where users sign in for SMART App
// Launch through the gateway: the gateway is its confidential client, and its sign-in
// pages are oidc-provider's own (development interactions: any password). Each account's
// id_token carries a `fhirUser` claim: the login "p1" is Patient/p1, "doc" is
// Practitioner/doc.
//
// Environment: PORT, GATEWAY_CALLBACK (the gateway's /auth/callback), GATEWAY_SECRET.
// Prints "LISTENING <issuer>" once it accepts requests.

import Provider from 'oidc-provider';

const required = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`missing ${name}`);
    process.exit(2);
  }
  return v;
};

const port = Number(required('PORT'));
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'smartgate',
      client_secret: required('GATEWAY_SECRET'),
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['authorization_code'],
      response_types: ['code'],
      redirect_uris: [required('GATEWAY_CALLBACK')],
    },
  ],
  scopes: ['openid', 'fhirUser'],
  claims: { openid: ['sub'], fhirUser: ['fhirUser'] },
  // The claims of the granted scopes go into the id_token itself (the gateway reads no
  // userinfo).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true } },
  // The gateway is a first-party client: no consent screen at the provider (the gateway
  // shows its own).
  loadExistingGrant: async (ctx) => {
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid fhirUser');
    await grant.save();
    return grant;
  },
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({
      sub: id,
      fhirUser: id === 'doc' ? 'Practitioner/doc' : `Patient/${id}`,
    }),
  }),
  pkce: { required: () => false },
});

provider.on('server_error', (ctx, err) => console.error('server_error', err));

provider.listen(port, '127.0.0.1', () => {
  console.log(`LISTENING ${issuer}`);
});
