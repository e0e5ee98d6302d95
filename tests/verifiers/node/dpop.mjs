// DPoP (RFC 9449) done by an independent library, the npm package `jose`: a client making proofs,
// and a resource server checking a DPoP-bound token of delegation-operator with a proof.
//
// Usage: JOSE_DIR=<dir with node_modules/jose> node dpop.mjs prove < request.json
//        JOSE_DIR=... node dpop.mjs check --issuer URL --ca FILE --audience AUD < presented.json
//
// prove: stdin {"key": <private JWK> | null, "htm", "htu", "token"?}; makes an ES256 key when "key"
//   is null and prints {"key": <private JWK>, "jkt": <RFC 7638 thumbprint>, "proof": <DPoP proof
//   JWT, with ath the hash of "token" when given>}.
// check: stdin {"token", "proof", "htm", "htu"}; verifies the token against the issuer's JWKS
//   (discovery over HTTPS trusting only FILE; typ at+jwt, ES256, iss, aud, exp), then the proof as
//   RFC 9449 §4.3 says: typ dpop+jwt, ES256/EdDSA, signed by the public jwk in its header, htm, htu,
//   iat within 60 s, ath the token's hash, and the jwk's thumbprint the token's cnf.jkt. Prints
//   {"accepted": bool, "reason": "..."}. Tokens and keys go through stdin and stdout only.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import { getJSON } from './https_json.mjs';

const joseDir = join(process.env.JOSE_DIR ?? '', 'node_modules', 'jose');
const joseManifest = JSON.parse(readFileSync(join(joseDir, 'package.json'), 'utf8'));
const jose = await import(pathToFileURL(join(joseDir, joseManifest.exports['.'].default)).href);

const mode = process.argv[2];
const { values: args } = parseArgs({
  args: process.argv.slice(3),
  options: { issuer: { type: 'string' }, ca: { type: 'string' }, audience: { type: 'string' } },
});
const input = JSON.parse(readFileSync(0, 'utf8'));

const ath = (token) => createHash('sha256').update(token).digest('base64url');

async function prove() {
  let privateJwk = input.key;
  if (!privateJwk) {
    const { privateKey } = await jose.generateKeyPair('ES256', { extractable: true });
    privateJwk = await jose.exportJWK(privateKey);
  }
  const { d, ...publicJwk } = privateJwk;
  const key = await jose.importJWK(privateJwk, 'ES256');
  const claims = { htm: input.htm, htu: input.htu, jti: crypto.randomUUID() };
  if (input.token) claims.ath = ath(input.token);
  const proof = await new jose.SignJWT(claims)
    .setProtectedHeader({ alg: 'ES256', typ: 'dpop+jwt', jwk: publicJwk })
    .setIssuedAt()
    .sign(key);
  const jkt = await jose.calculateJwkThumbprint(publicJwk, 'sha256');
  return { key: privateJwk, jkt, proof };
}

async function check() {
  const ca = readFileSync(args.ca, 'utf8');
  const discovery = await getJSON(`${args.issuer}/.well-known/openid-configuration`, ca);
  const jwks = jose.createLocalJWKSet(await getJSON(discovery.jwks_uri, ca));
  let token;
  try {
    ({ payload: token } = await jose.jwtVerify(input.token, jwks, {
      algorithms: ['ES256'], typ: 'at+jwt', issuer: args.issuer, audience: args.audience,
      requiredClaims: ['exp'],
    }));
  } catch (e) {
    return { accepted: false, reason: `token: ${e.code ?? e.message}` };
  }
  let proof;
  try {
    proof = await jose.jwtVerify(input.proof, jose.EmbeddedJWK, {
      algorithms: ['ES256', 'EdDSA'], typ: 'dpop+jwt', maxTokenAge: '60s', requiredClaims: ['iat', 'jti'],
    });
  } catch (e) {
    return { accepted: false, reason: `proof: ${e.code ?? e.message}` };
  }
  const { payload, protectedHeader } = proof;
  if (payload.htm !== input.htm) return { accepted: false, reason: 'proof: htm' };
  if (payload.htu !== input.htu) return { accepted: false, reason: 'proof: htu' };
  if (payload.ath !== ath(input.token)) return { accepted: false, reason: 'proof: ath' };
  const jkt = await jose.calculateJwkThumbprint(protectedHeader.jwk, 'sha256');
  if (!token.cnf || token.cnf.jkt !== jkt) return { accepted: false, reason: 'cnf.jkt is not the proof key' };
  return { accepted: true, reason: 'ok' };
}

const out = mode === 'prove' ? await prove() : mode === 'check' ? await check() : null;
if (!out) {
  console.error('dpop.mjs: prove or check');
  process.exit(2);
}
console.log(JSON.stringify(out));
