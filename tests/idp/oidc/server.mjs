// The OpenID provider of ctxpool's token-provider tests (tests/support/idp.rs starts it).
//
// One process per test binary, on loopback, on ports the OS picks. It serves the
// `oidc-provider` package (OpenID Certified) behind path prefixes, so that ctxpool's
// token sources find the endpoints where they look for them:
//
//   /<any>/oauth2/v2.0/token   the Entra ID shape (secret in the form, on-behalf-of)
//   /<any>/oauth2/v1/token     the OCI IAM shape (HTTP Basic)
//
// Requests are counted per path, so that each test, using its own prefix, counts its own.
//
// Added to the package's own grants:
//   - the Entra-style on-behalf-of grant (`urn:ietf:params:oauth:grant-type:jwt-bearer`
//     with `requested_token_use=on_behalf_of`), registered with `registerGrantType`: the
//     assertion must be a user token signed by the key set below; the answer is a JWT for
//     that user.
//   - test endpoints under /test/: a signed user token for a subject, the JWKS of user
//     tokens, a key rotation, and a counter of token requests per path.
//
// Configuration comes from the environment: IDP_CLIENTS (JSON list of client metadata),
// IDP_TLS_CERT / IDP_TLS_KEY (PEM files: also listen with https). When listening it prints
// one line `ready {"http":port,"https":port}` on stdout; the harness waits for that line.

import http from 'node:http';
import https from 'node:https';
import { readFileSync, rmSync } from 'node:fs';
import Provider, { errors } from 'oidc-provider';
import { SignJWT, exportJWK, generateKeyPair, jwtVerify, createLocalJWKSet } from 'jose';

const RESOURCE = 'https://db.example.com';
const SCOPE = 'https://db.example.com/.default';
const TOKEN_TTL = Number(process.env.IDP_TOKEN_TTL || 300);
const OBO_GRANT = 'urn:ietf:params:oauth:grant-type:jwt-bearer';

// The keys that sign user tokens (and on-behalf-of answers). The newest signs; all are
// published until /test/rotate?drop=1 removes the older ones.
const userKeys = [];
async function addUserKey() {
  const { publicKey, privateKey } = await generateKeyPair('RS256', { extractable: true });
  const kid = `user-key-${userKeys.length + 1}`;
  const jwk = { ...(await exportJWK(publicKey)), kid, alg: 'RS256', use: 'sig' };
  userKeys.push({ kid, privateKey, jwk });
}
await addUserKey();
const publishedJwks = () => ({ keys: userKeys.map((k) => k.jwk) });

const clients = JSON.parse(process.env.IDP_CLIENTS || '[]');
// Filled in once the port is known.
let issuer = 'http://127.0.0.1';

async function signUserToken(claims, ttl) {
  const key = userKeys[userKeys.length - 1];
  return new SignJWT(claims)
    .setProtectedHeader({ alg: 'RS256', kid: key.kid, typ: 'JWT' })
    .setIssuer(issuer)
    .setIssuedAt()
    .setExpirationTime(`${ttl}s`)
    .sign(key.privateKey);
}

function startProvider() {
  const provider = new Provider(issuer, {
    clients,
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: false },
      resourceIndicators: {
        enabled: true,
        // A client-credentials request names no resource: the database is the default.
        defaultResource: () => RESOURCE,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: SCOPE,
          audience: RESOURCE,
          accessTokenTTL: TOKEN_TTL,
          accessTokenFormat: 'jwt',
        }),
      },
    },
    scopes: [SCOPE],
    ttl: { ClientCredentials: TOKEN_TTL },
  });

  provider.registerGrantType(
    OBO_GRANT,
    async (ctx) => {
      const { assertion, requested_token_use: use, scope } = ctx.oidc.params;
      if (use !== 'on_behalf_of') {
        throw new errors.InvalidRequest('requested_token_use must be on_behalf_of');
      }
      if (!ctx.oidc.client.grantTypeAllowed(OBO_GRANT)) {
        throw new errors.UnauthorizedClient('the client may not use on-behalf-of');
      }
      let user;
      try {
        ({ payload: user } = await jwtVerify(assertion, createLocalJWKSet(publishedJwks()), {
          issuer,
        }));
      } catch {
        throw new errors.InvalidGrant('the assertion does not verify');
      }
      const accessToken = await signUserToken(
        { sub: user.sub, aud: RESOURCE, scp: scope, azp: ctx.oidc.client.clientId, obo: true },
        TOKEN_TTL,
      );
      ctx.body = { token_type: 'Bearer', access_token: accessToken, expires_in: TOKEN_TTL };
    },
    new Set(['assertion', 'requested_token_use', 'scope']),
  );
  return provider;
}

const requests = {};
let provider;

async function handle(req, res) {
  const url = new URL(req.url, 'http://localhost');
  const json = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (url.pathname === '/test/jwks') return json(200, publishedJwks());
  if (url.pathname === '/test/requests') return json(200, requests);
  if (url.pathname === '/test/user-token') {
    const claims = { sub: url.searchParams.get('sub'), aud: url.searchParams.get('aud') };
    const roles = url.searchParams.get('roles');
    if (roles) claims.roles = roles.split(',');
    return json(200, { token: await signUserToken(claims, Number(url.searchParams.get('ttl') || 600)) });
  }
  if (url.pathname === '/test/rotate') {
    await addUserKey();
    if (url.searchParams.get('drop')) userKeys.splice(0, userKeys.length - 1);
    return json(200, { kid: userKeys[userKeys.length - 1].kid });
  }
  // Any prefix: each test uses its own, so that its request counts are its own.
  if (/\/oauth2\/(v1|v2\.0)\/token$/.test(url.pathname)) {
    requests[url.pathname] = (requests[url.pathname] || 0) + 1;
    req.url = '/token';
  }
  return provider.callback()(req, res);
}

const listen = (server) =>
  new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)));

const plain = http.createServer((req, res) => handle(req, res));
const httpPort = await listen(plain);
issuer = `http://127.0.0.1:${httpPort}`;
provider = startProvider();
let httpsPort = null;
if (process.env.IDP_TLS_CERT) {
  const secure = https.createServer(
    { cert: readFileSync(process.env.IDP_TLS_CERT), key: readFileSync(process.env.IDP_TLS_KEY) },
    (req, res) => handle(req, res),
  );
  httpsPort = await listen(secure);
}
// The harness holds our stdin: when it goes away (the test binary ended, however), so do we.
const leave = () => {
  // The harness's temporary folder (certificates) goes with us.
  if (process.env.IDP_TMP) rmSync(process.env.IDP_TMP, { recursive: true, force: true });
  process.exit(0);
};
process.stdin.on('end', leave);
process.stdin.on('error', leave);
process.stdin.resume();
process.stdout.write(`ready ${JSON.stringify({ http: httpPort, https: httpsPort })}\n`);
