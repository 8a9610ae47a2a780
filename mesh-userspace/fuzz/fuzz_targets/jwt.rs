//! Request authentication with untrusted inputs on both sides: a key set (from an object, a
//! user's file) and a bearer token (from any client). Input: the JWKS, a NUL byte, the token.
//! No input may panic, and a token no key signed is never accepted.
#![no_main]

use hyper::HeaderMap;
use libfuzzer_sys::fuzz_target;
use weft::{
    proxy::authn::Authenticator,
    state::access::{JwtIssuer, KeySource},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (jwks, token) = text.split_once('\0').unwrap_or(("{\"keys\": []}", text));
    let issuer = JwtIssuer {
        policy: "shop/jwt".into(),
        index: 0,
        issuer: "https://issuer.test".into(),
        audiences: vec!["web".into()],
        keys: KeySource::Inline(jwks.into()),
        from_headers: Vec::new(),
        forward: false,
    };
    let (auth, _problems) = Authenticator::new(&[issuer]);
    let mut headers = HeaderMap::new();
    if let Ok(v) = format!("Bearer {token}").parse() {
        headers.insert("authorization", v);
        // A fuzzer cannot forge a signature: anything it makes is refused or carries no token.
        if let Ok(Some(p)) = auth.authenticate(&mut headers, "shop/web") {
            panic!("accepted a forged token: {}", p.name());
        }
    }
});
