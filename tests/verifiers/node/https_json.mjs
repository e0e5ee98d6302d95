// GET a JSON document over HTTPS trusting only the CA given (PEM text), for the verifiers here.

import { request } from 'node:https';

export function getJSON(url, ca) {
  if (!url.startsWith('https://')) throw new Error(`refusing a non-https URL: ${url}`);
  return new Promise((resolve, reject) => {
    const req = request(url, { ca, timeout: 20000, headers: { accept: 'application/json' } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => {
        if (res.statusCode !== 200) return reject(new Error(`GET ${url}: ${res.statusCode}`));
        try { resolve(JSON.parse(body)); } catch (e) { reject(e); }
      });
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: timeout`)));
    req.on('error', reject);
    req.end();
  });
}
