//! The Status List Token as the operator would publish it, checked from the outside: an independent
//! decoder (`tests/python/decode_status_list.py`, Python's standard library only) reads the very
//! token the Rust code signed, and jsonwebtoken verifies it against the operator's JWKS.

use std::io::Write;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use delegation_operator::signing::{Algorithm, Keyring, SigningError, SigningKey, verify};
use delegation_operator::status_list::{
    Registry, RegistryConfig, STATUS_LIST_TYP, Status, StatusList, TokenStatusRef,
    status_list_claims,
};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{Value, json};

const NOW: i64 = 1_800_000_000;
const BASE_URI: &str = "https://delegation-operator.delegation-system.svc/statuslists/3f6e0c1a";

/// xorshift64*: reproducible "random" indices and statuses without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A registry after a day's traffic in one list: `tokens` issued, some revoked, some suspended,
/// some of those reinstated. Returns the references with the status each must have.
fn registry_with_traffic(tokens: usize) -> (Registry, Vec<(TokenStatusRef, Status)>) {
    let config = RegistryConfig {
        list_capacity: 8192,
        ..RegistryConfig::new(BASE_URI, 86_400)
    };
    let mut registry = Registry::new(config).unwrap();
    let mut rng = Rng(0x5EED);
    let mut issued = Vec::with_capacity(tokens);
    for _ in 0..tokens {
        let allocation = registry.allocate(NOW, NOW + 600).unwrap();
        let status_ref = allocation.status_ref;
        let status = match rng.below(10) {
            0 | 1 => {
                assert!(registry.revoke(&status_ref).unwrap());
                Status::Invalid
            }
            2 => {
                assert!(registry.suspend(&status_ref).unwrap());
                Status::Suspended
            }
            3 => {
                registry.suspend(&status_ref).unwrap();
                assert!(registry.reinstate(&status_ref).unwrap());
                Status::Valid
            }
            _ => Status::Valid,
        };
        issued.push((status_ref, status));
    }
    (registry, issued)
}

fn ring(alg: Algorithm) -> Keyring {
    Keyring::new(SigningKey::generate(alg, NOW).unwrap())
}

/// The Status List Token of the registry's only list, signed by `ring`'s active key.
fn status_list_token(registry: &Registry, ring: &Keyring) -> (String, String, StatusList) {
    let mut lists = registry.lists();
    let (uri, list) = lists.next().expect("one list");
    assert!(lists.next().is_none(), "the traffic fits one list");
    let claims = status_list_claims(uri, list, NOW, Some(NOW + 900), NonZeroU64::new(300));
    let token = ring.active().sign_typed(&claims, STATUS_LIST_TYP).unwrap();
    (token, uri.to_owned(), list.clone())
}

/// A file removed when the test ends, pass or fail.
struct TempFile(PathBuf);

impl TempFile {
    fn with(contents: &str) -> Self {
        let unique = format!(
            "delegation-operator-status-list-{}-{:?}.jwt",
            std::process::id(),
            std::thread::current().id()
        );
        let path = std::env::temp_dir().join(unique.replace(['(', ')'], ""));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the Python decoder on `token_file`, asking for `indices`; returns its lines.
fn python_decode(token_file: &Path, indices: &[usize]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/decode_status_list.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(token_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for this test");
    let input: String = indices.iter().map(|i| format!("{i}\n")).collect();
    // Written from a thread so that a large output cannot deadlock against a full stdin pipe.
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        output.status.success(),
        "decoder failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_independent_python_decoder_reads_the_same_statuses() {
    let (registry, issued) = registry_with_traffic(5000);
    let ring = ring(Algorithm::ES256);
    let (token, uri, list) = status_list_token(&registry, &ring);
    let file = TempFile::with(&token);

    // Every issued token's entry and its lineage's (which follow it), with the status each must
    // have; then a few thousand random indices across the whole list (unused ones are VALID), and
    // the first index past the end.
    let mut expected: Vec<(usize, Status)> = Vec::new();
    for (status_ref, status) in &issued {
        assert_eq!(status_ref.uri, uri);
        let lineage = registry
            .lineage_of(status_ref)
            .expect("a lineage by default");
        expected.push((status_ref.idx, *status));
        expected.extend((lineage.first..lineage.first + lineage.count).map(|idx| (idx, *status)));
    }
    let mut rng = Rng(42);
    let mut indices: Vec<usize> = expected.iter().map(|(idx, _)| *idx).collect();
    indices.extend((0..3000).map(|_| rng.below(list.len())));
    indices.push(list.len());

    let lines = python_decode(&file.0, &indices);
    assert_eq!(lines.len(), indices.len() + 1);
    let meta: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        meta,
        json!({"typ": "statuslist+jwt", "sub": uri, "bits": 2, "len": list.len()})
    );

    let mut seen = [0usize; 3];
    for (idx, line) in indices.iter().zip(&lines[1..]) {
        match list.value(*idx) {
            Some(value) => {
                assert_eq!(line, &value.to_string(), "index {idx}");
                seen[usize::from(value)] += 1;
            }
            None => assert_eq!(line, "out-of-range", "index {idx}"),
        }
    }
    // What the registry was told is what Python reads, for each token and its lineage.
    for ((idx, status), line) in expected.iter().zip(&lines[1..]) {
        assert_eq!(line, &status.value().to_string(), "index {idx}");
    }
    let [valid, invalid, suspended] = seen;
    assert!(valid > 3000 && invalid > 500 && suspended > 200, "{seen:?}");
}

/// jsonwebtoken checks the signature against the JWK the operator publishes; `typ` is
/// `statuslist+jwt`, the claims are the draft's, and the list decodes to what was signed.
#[test]
fn status_list_tokens_verify_against_the_jwks_and_are_not_access_tokens() {
    let (registry, _) = registry_with_traffic(300);
    for alg in [Algorithm::ES256, Algorithm::EdDSA] {
        let ring = ring(alg);
        let (token, uri, list) = status_list_token(&registry, &ring);

        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("statuslist+jwt"));
        assert_eq!(header.kid.as_deref(), Some(ring.active().kid()));
        let jwk: Jwk = serde_json::from_value(ring.jwks()["keys"][0].clone()).unwrap();
        let mut validation = Validation::new(header.alg);
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["sub", "iat", "exp"]);
        // The token's fixed times lie in the future: check exp against them, not the wall clock.
        validation.validate_exp = false;
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
            .unwrap()
            .claims;
        assert_eq!(
            claims,
            json!({"sub": uri, "iat": NOW, "exp": NOW + 900, "ttl": 300, "status_list": list.to_claim()})
        );
        assert_eq!(
            StatusList::from_claim(&claims["status_list"]).unwrap(),
            list
        );

        // Another key's signature does not verify.
        let stranger = SigningKey::generate(alg, NOW)
            .unwrap()
            .sign_typed(&claims, STATUS_LIST_TYP)
            .unwrap();
        assert!(jsonwebtoken::decode::<Value>(&stranger, &key, &validation).is_err());

        // Same keys as the access tokens, but never accepted as one.
        assert!(matches!(
            verify(&token, &ring.jwks(), "https://tickets.example.com", 0),
            Err(SigningError::WrongType)
        ));
    }
}

/// The whole check a resource server makes: the access token's `status` claim names the list and
/// index; the list token's `sub` is that uri; the entry is INVALID once revoked.
#[test]
fn a_revoked_access_token_reads_invalid_in_the_published_list() {
    let ring = ring(Algorithm::ES256);
    let mut registry = Registry::new(RegistryConfig::new(BASE_URI, 86_400)).unwrap();
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let aud = "https://tickets.example.com";
    let access_token = |registry: &mut Registry| {
        let status_ref = registry.allocate(now, now + 600).unwrap().status_ref;
        let claims = json!({"sub": "alice", "aud": aud, "exp": now + 600, "status": status_ref.status_claim()});
        ring.active().sign(&claims).unwrap()
    };
    let kept = access_token(&mut registry);
    let revoked = access_token(&mut registry);

    let status_of = |registry: &Registry, token: &str| {
        let claims = verify(token, &ring.jwks(), aud, 0).unwrap();
        let status_ref = TokenStatusRef::from_status_claim(&claims["status"]).unwrap();
        let (uri, list) = registry
            .lists()
            .find(|(uri, _)| *uri == status_ref.uri)
            .unwrap();
        let published = status_list_claims(uri, list, now, Some(now + 900), None);
        let list_token = ring
            .active()
            .sign_typed(&published, STATUS_LIST_TYP)
            .unwrap();
        let payload = list_token.split('.').nth(1).unwrap();
        let payload: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(payload["sub"], status_ref.uri.as_str());
        StatusList::from_claim(&payload["status_list"])
            .unwrap()
            .get(status_ref.idx)
            .unwrap()
    };
    assert_eq!(status_of(&registry, &revoked), Status::Valid);
    let claims = verify(&revoked, &ring.jwks(), aud, 0).unwrap();
    let status_ref = TokenStatusRef::from_status_claim(&claims["status"]).unwrap();
    assert!(registry.revoke(&status_ref).unwrap());
    assert_eq!(status_of(&registry, &revoked), Status::Invalid);
    assert_eq!(status_of(&registry, &kept), Status::Valid);
}
