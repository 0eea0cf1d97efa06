//! Client configuration that needs no server: the builder refuses what it
//! cannot use and normalises what it can. Behaviour on the wire is tested
//! against real kvd processes in the root package (tests/client.rs).

use std::time::Duration;

use kvclient::{Client, Error};

#[test]
fn builder_rejects_unusable_configuration() {
    let err = Client::builder().build().unwrap_err();
    assert!(matches!(err, Error::NoEndpoints));
    let err = Client::new(["ftp://127.0.0.1:1"]).unwrap_err();
    assert_eq!(err.code(), "invalid_endpoint");
    let err = Client::builder()
        .endpoint("127.0.0.1:1")
        .request_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.code(), "invalid_config");
    let err = Client::builder()
        .endpoint("127.0.0.1:1")
        .retry_deadline(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.code(), "invalid_config");
    let client = Client::new(["127.0.0.1:1", "http://127.0.0.1:1/"]).unwrap();
    assert_eq!(
        client.endpoints(),
        ["http://127.0.0.1:1"],
        "normalised and deduplicated"
    );
    assert_eq!(client.current_endpoint(), "http://127.0.0.1:1");
}
