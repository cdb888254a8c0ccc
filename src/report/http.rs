//! HTTP callback reporter: a signed POST to the source's callback URL (or
//! the per-event URL given at intake).
//!
//! The body is [`Report::body`]; `X-Duvo-Bridge-Signature: sha256=<hex>` is
//! the HMAC-SHA256 of the exact body bytes with the configured secret, so a
//! receiver verifies it before parsing. `X-Duvo-Bridge-Report-Id` is stable
//! across re-sends (dedupe key). Any 2xx acknowledges the report; anything
//! else, or no answer, is retried by the dispatcher.

use std::time::Duration;

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::callback_policy::CallbackPolicy;
use super::{Report, ReportError, Reporter};
use crate::outbox::Origin;
use crate::secret::Secret;

/// Header carrying the body's HMAC-SHA256.
pub const SIGNATURE_HEADER: &str = "x-duvo-bridge-signature";
/// Header carrying the report id (stable across re-sends).
pub const REPORT_ID_HEADER: &str = "x-duvo-bridge-report-id";
/// Intake header naming a per-request callback URL (when allowed).
pub const CALLBACK_URL_HEADER: &str = "x-duvo-callback-url";

/// `sha256=<lowercase hex>` of the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Where an HTTP source's reports go (its config builds it:
/// `HttpSourceConfig::report_target`).
#[derive(Debug, Clone)]
pub struct HttpTarget {
    /// Name of the source (errors).
    pub source: String,
    /// Callback URL of events that brought none of their own.
    pub default_url: Option<String>,
    /// HMAC key of the signatures.
    pub secret: Secret,
    /// Timeout of one callback request.
    pub timeout: Duration,
    /// Where per-request callback URLs may go.
    pub policy: CallbackPolicy,
    /// How long a report to a per-request URL is retried.
    pub header_url_max_age: Duration,
}

/// Why the reporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpReporterError {
    #[error("source {source_name}: cannot build the HTTP client: {err}")]
    Client {
        source_name: String,
        err: reqwest::Error,
    },
}

/// Posts reports of one HTTP source.
pub struct HttpReporter {
    client: reqwest::Client,
    /// For per-request URLs: resolves only to addresses `policy` permits.
    guarded: reqwest::Client,
    policy: CallbackPolicy,
    default_url: Option<String>,
    secret: Secret,
    header_url_max_age: Duration,
}

impl std::fmt::Debug for HttpReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpReporter")
            .field(
                "default_url",
                &self.default_url.as_deref().map(crate::secret::redact_url),
            )
            .field("secret", &self.secret)
            .finish()
    }
}

impl HttpReporter {
    /// The reporter of an HTTP source.
    pub fn new(target: HttpTarget) -> Result<HttpReporter, HttpReporterError> {
        let build = |guard: Option<&CallbackPolicy>| {
            let mut b = reqwest::Client::builder()
                .timeout(target.timeout)
                // A redirect is an answer that is not 2xx: never followed,
                // so a receiver cannot bounce a signed report (with its
                // event) to an address nobody configured.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("duvo-bridge/", env!("CARGO_PKG_VERSION")));
            if let Some(p) = guard {
                b = b.dns_resolver(p.clone().resolver());
            }
            b.build().map_err(|err| HttpReporterError::Client {
                source_name: target.source.clone(),
                err,
            })
        };
        Ok(HttpReporter {
            client: build(None)?,
            guarded: build(Some(&target.policy))?,
            policy: target.policy.clone(),
            default_url: target.default_url,
            secret: target.secret,
            header_url_max_age: target.header_url_max_age,
        })
    }

    /// The URL of `report`, and whether the event brought it (a
    /// per-request URL, held to the policy) rather than the configuration.
    fn url_for<'a>(&'a self, report: &'a Report) -> Option<(&'a str, bool)> {
        match &report.origin {
            Some(Origin::Http {
                callback_url: Some(u),
                ..
            }) => Some((u, true)),
            _ => self.default_url.as_deref().map(|u| (u, false)),
        }
    }
}

impl Reporter for HttpReporter {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn send<'a>(&'a self, report: &'a Report) -> BoxFuture<'a, Result<(), ReportError>> {
        Box::pin(async move {
            let Some((url, per_request)) = self.url_for(report) else {
                return Err(ReportError::NoDestination(
                    "no callback_url configured and none given with the event".into(),
                ));
            };
            if per_request && let Err(e) = self.policy.check_url(url) {
                return Err(ReportError::NoDestination(format!(
                    "callback URL refused: {e}"
                )));
            }
            let client = if per_request {
                &self.guarded
            } else {
                &self.client
            };
            let body = report.body();
            let sig = signature(self.secret.expose().as_bytes(), &body);
            let resp = client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, sig)
                .header(REPORT_ID_HEADER, report.id.to_string())
                .body(body)
                .send()
                .await
                .map_err(|e| ReportError::Unreachable(e.without_url().to_string()))?;
            let status = resp.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(ReportError::Refused(format!("callback answered {status}")))
            }
        })
    }

    /// The effective callback URL without user info, query or fragment:
    /// those may carry credentials or tokens (logs show the key), and two
    /// URLs that differ only there name the same endpoint, which is what a
    /// backoff is about.
    fn destination(&self, report: &Report) -> String {
        match self.url_for(report) {
            Some((u, _)) => endpoint(u),
            None => "(no callback url)".into(),
        }
    }

    /// Only a URL a client gave (the header) has a bounded life; the
    /// operator's `callback_url` is retried until it answers.
    fn give_up_after(&self, report: &Report) -> Option<Duration> {
        match self.url_for(report) {
            Some((_, true)) => Some(self.header_url_max_age),
            _ => None,
        }
    }
}

/// `url` reduced to scheme, host, port and path (see
/// [`HttpReporter::destination`]).
fn endpoint(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(unparsable callback url)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_per_request_url_resolving_to_this_host_is_never_called() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = std::sync::Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let sink = axum::Router::new().fallback(move || {
            h.fetch_add(1, Ordering::SeqCst);
            async { "ok" }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(l, sink).await });
        let reporter = |policy| {
            HttpReporter::new(HttpTarget {
                source: "oms".into(),
                default_url: None,
                secret: Secret::new("k"),
                timeout: Duration::from_secs(5),
                policy,
                header_url_max_age: Duration::from_secs(3600),
            })
            .unwrap()
        };
        let mut report = sample_report();
        report.origin = Some(Origin::Http {
            callback_url: Some(format!("http://localhost:{port}/cb")),
            callback_ref: None,
        });
        let e = reporter(CallbackPolicy::default())
            .send(&report)
            .await
            .unwrap_err();
        assert!(matches!(e, ReportError::NoDestination(_)), "{e}");
        // A name (not `localhost` itself) that resolves to loopback fails
        // at resolution.
        report.origin = Some(Origin::Http {
            callback_url: Some(format!("http://localhost.:{port}/cb")),
            callback_ref: None,
        });
        assert!(
            reporter(CallbackPolicy::default())
                .send(&report)
                .await
                .is_err()
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        // Allowed by name: delivered.
        report.origin = Some(Origin::Http {
            callback_url: Some(format!("http://localhost:{port}/cb")),
            callback_ref: None,
        });
        let allow = CallbackPolicy::new(&["localhost".into()]).unwrap();
        reporter(allow).send(&report).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    fn sample_report() -> Report {
        Report {
            id: 1,
            source: "oms".into(),
            event_id: crate::outbox::EventId(1),
            origin: None,
            queue_id: uuid::Uuid::nil(),
            case_id: None,
            status: crate::outbox::ReportStatus::Rejected,
            reason: None,
            case_updated_at: None,
            title: "t".into(),
            event: Some("{}".into()),
            created_at_ms: 0,
            attempts: 0,
        }
    }

    #[tokio::test]
    async fn a_redirect_is_refused_and_never_followed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = std::sync::Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let elsewhere = axum::Router::new().fallback(move || {
            h.fetch_add(1, Ordering::SeqCst);
            async { "ok" }
        });
        let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = format!("http://{}/stolen", l2.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l2, elsewhere).await });
        let loc = other.clone();
        let redirecting = axum::Router::new().fallback(move || {
            let loc = loc.clone();
            async move {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, loc)],
                )
            }
        });
        let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/callback", l1.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l1, redirecting).await });
        let r = HttpReporter::new(HttpTarget {
            source: "oms".into(),
            default_url: Some(url),
            secret: Secret::new("k"),
            timeout: Duration::from_secs(5),
            policy: CallbackPolicy::default(),
            header_url_max_age: Duration::from_secs(3600),
        })
        .unwrap();
        let report = sample_report();
        let e = r.send(&report).await.unwrap_err();
        assert!(matches!(e, ReportError::Refused(_)), "{e}");
        assert!(e.to_string().contains("307"), "{e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            hits.load(Ordering::SeqCst),
            0,
            "the redirect was not followed"
        );
    }

    #[test]
    fn the_destination_is_the_callback_endpoint_without_secrets() {
        assert_eq!(
            endpoint("https://user:pw@hooks.example.com:8443/cb/1?token=abc#x"),
            "https://hooks.example.com:8443/cb/1"
        );
        assert_eq!(endpoint("not a url"), "(unparsable callback url)");
    }

    #[test]
    fn signature_matches_rfc4231_test_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn only_a_url_from_the_request_has_a_bounded_life() {
        let r = HttpReporter::new(HttpTarget {
            source: "oms".into(),
            default_url: Some("https://user:pw@ops.example/cb?token=t".into()),
            secret: Secret::new("k"),
            timeout: Duration::from_secs(5),
            policy: CallbackPolicy::default(),
            header_url_max_age: Duration::from_secs(7200),
        })
        .unwrap();
        let mut report = sample_report();
        assert_eq!(r.give_up_after(&report), None, "the operator's URL");
        report.origin = Some(Origin::Http {
            callback_url: Some("https://client.example/cb".into()),
            callback_ref: None,
        });
        assert_eq!(r.give_up_after(&report), Some(Duration::from_secs(7200)));
        let debug = format!("{r:?}");
        assert!(
            !debug.contains("pw") && !debug.contains("token=t"),
            "{debug}"
        );
    }
}
