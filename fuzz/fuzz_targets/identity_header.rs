//! Version 3's identity header (`latchkey_shared::sign::gateway`), as an upstream reads it: any
//! value a client or a proxy could put in `x-latchkey-identity` is refused without a panic, and
//! an identity the edge signs comes back intact whatever its subject and scopes hold.
#![no_main]

use latchkey_shared::UnixMillis;
use latchkey_shared::sign::SigningSecret;
use latchkey_shared::sign::gateway::{
    GatewayVerifier, Received, SignedRequest, content_sha256, header,
};
use libfuzzer_sys::fuzz_target;

const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

const RECEIVED: Received<'static> = Received {
    method: "GET",
    path: "/orders/42",
    query: "page=2",
    body: b"",
};

fn secret() -> SigningSecret {
    SigningSecret::parse("fuzz-upstream-secret-0123456789abcdef").unwrap_or_else(|e| panic!("{e}"))
}

fuzz_target!(|input: &str| {
    // Unsigned: whatever it says, it is refused.
    let refused = GatewayVerifier::new(secret(), 16).verify(
        &RECEIVED,
        |name| (name == header::IDENTITY).then_some(input),
        NOW,
    );
    assert!(refused.is_err(), "accepted an unsigned identity: {input:?}");

    // Signed by the edge: the subject is any text; the scopes are the input's words.
    let scopes: Vec<&str> = input.split_whitespace().collect();
    let scopes = scopes.join(" ");
    let digest = content_sha256(b"");
    let signed = SignedRequest {
        timestamp: NOW,
        request_id: "0f6e2c1a-7d0b-4c55-9d64-3f2b8b1e9a10",
        method: RECEIVED.method,
        path: RECEIVED.path,
        query: RECEIVED.query,
        content_sha256: &digest,
        key_id: "key_fuzz",
        subject: input,
        scopes: &scopes,
    };
    let mut verifier = GatewayVerifier::new(secret(), 16);
    let value = signed.identity(&secret());
    let identity = verifier
        .verify(&RECEIVED, |name| (name == header::IDENTITY).then_some(value.as_str()), NOW);
    // Words holding a comma cannot travel comma-separated; scopes never hold one.
    if scopes.contains(',') {
        return;
    }
    let identity = identity.unwrap_or_else(|e| panic!("{e}: {value:?}"));
    assert_eq!(identity.subject, input);
    assert_eq!(identity.scopes.join(" "), scopes);
});
