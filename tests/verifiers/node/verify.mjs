// An independent verifier of delegation-operator access tokens, written with the npm package `jose`.
//
// Usage: JOSE_DIR=<dir with node_modules/jose> node verify.mjs --issuer URL --ca FILE --audience AUD < tokens.json
//
// Fetches the issuer's OIDC discovery document over HTTPS (trusting only the CA in FILE), then the JWKS
// named by its jwks_uri, and checks each token of the JSON array on stdin ([{"name": ..., "token": ...}])
// with jose's jwtVerify: algorithm allow-list (ES256 only), typ "at+jwt" (RFC 9068), the signature
// (key chosen by kid), iss, aud, exp (required), nbf. Prints a JSON array with one verdict per token:
// {"name", "accepted", "reason", "sub", "jti", "actors"}. Tokens are never printed.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import { getJSON } from './https_json.mjs';

// jose is installed by hack/verifiers.sh into a cache, not next to this file.
const joseDir = join(process.env.JOSE_DIR ?? '', 'node_modules', 'jose');
const joseManifest = JSON.parse(readFileSync(join(joseDir, 'package.json'), 'utf8'));
const jose = await import(pathToFileURL(join(joseDir, joseManifest.exports['.'].default)).href);

const { values: args } = parseArgs({
  options: { issuer: { type: 'string' }, ca: { type: 'string' }, audience: { type: 'string' } },
});
if (!args.issuer || !args.ca || !args.audience) {
  console.error('verify.mjs: --issuer, --ca and --audience are required');
  process.exit(2);
}
const ca = readFileSync(args.ca, 'utf8');

function actors(payload) {
  const chain = [];
  for (let act = payload.act; act && typeof act === 'object'; act = act.act) chain.push(act.sub);
  return chain;
}

const discovery = await getJSON(`${args.issuer.replace(/\/$/, '')}/.well-known/openid-configuration`, ca);
if (discovery.issuer !== args.issuer) {
  throw new Error(`discovery names issuer ${discovery.issuer}, expected ${args.issuer}`);
}
const jwks = jose.createLocalJWKSet(await getJSON(discovery.jwks_uri, ca));

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const inputs = JSON.parse(Buffer.concat(chunks).toString('utf8'));

const verdicts = [];
for (const { name, token } of inputs) {
  const verdict = { name, accepted: false, verifier: `jose ${joseManifest.version}` };
  try {
    const { payload } = await jose.jwtVerify(token, jwks, {
      algorithms: ['ES256'],
      typ: 'at+jwt',
      issuer: args.issuer,
      audience: args.audience,
      requiredClaims: ['exp', 'iat', 'sub', 'jti'],
      clockTolerance: 0,
    });
    Object.assign(verdict, { accepted: true, reason: 'valid', sub: payload.sub, jti: payload.jti, actors: actors(payload) });
  } catch (e) {
    verdict.reason = `${e.code ?? e.name}: ${e.message}`;
  }
  verdicts.push(verdict);
}
console.log(JSON.stringify(verdicts, null, 2));
