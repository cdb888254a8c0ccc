//! Where a per-request callback (`X-Duvo-Callback-Url`, chosen by whoever
//! posts events) may go: never to this host, a private network, a
//! link-local or metadata address (169.254.169.254), an unspecified,
//! multicast or broadcast address, unless the source's `callback_allow`
//! names it (a host name, an address, or a `CIDR` prefix). The check runs
//! on the URL at intake (address literals, decimal forms included, as the
//! URL parser normalises them) and on every address a host name resolves
//! to when the report is sent, so a name that resolves somewhere forbidden
//! (DNS rebinding included) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// The allow-list of one source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallbackPolicy {
    hosts: Vec<String>,
    nets: Vec<(IpAddr, u8)>,
}

impl CallbackPolicy {
    /// Parse `callback_allow` entries; every bad one is an error.
    pub fn new(allow: &[String]) -> Result<CallbackPolicy, Vec<String>> {
        let mut p = CallbackPolicy::default();
        let mut errors = Vec::new();
        for entry in allow {
            let e = entry.trim();
            if let Some((addr, bits)) = e.split_once('/') {
                match (addr.parse::<IpAddr>(), bits.parse::<u8>()) {
                    (Ok(ip), Ok(b)) if b <= if ip.is_ipv4() { 32 } else { 128 } => {
                        p.nets.push((ip, b))
                    }
                    _ => errors.push(format!("{e:?} is not an address prefix like 10.0.0.0/8")),
                }
            } else if let Ok(ip) = e.trim_matches(['[', ']']).parse::<IpAddr>() {
                p.nets.push((ip, if ip.is_ipv4() { 32 } else { 128 }));
            } else if !e.is_empty()
                && e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                p.hosts.push(e.to_ascii_lowercase());
            } else {
                errors.push(format!("{e:?} is neither a host name nor an address"));
            }
        }
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors)
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&h)
    }

    /// Whether a callback may connect to `ip` (reached through `host`).
    pub fn permits(&self, host: &str, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !forbidden(ip)
            || self.host_allowed(host)
            || self
                .nets
                .iter()
                .any(|(net, bits)| in_net(ip, canonical(*net), *bits))
    }

    /// The check at intake: `Err` for a URL whose host is an address (or
    /// `localhost`) the policy does not permit. Other host names are
    /// checked on their addresses when the report is sent.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let u = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
        let host = u.host_str().unwrap_or("");
        let ip = match u.host() {
            Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
            Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
            Some(url::Host::Domain(d))
                if d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost") =>
            {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            }
            _ => return Ok(()),
        };
        if self.permits(host, ip) {
            Ok(())
        } else {
            Err(format!(
                "{ip} is a loopback, private, link-local or otherwise internal address; a source's callback_allow must name it"
            ))
        }
    }

    /// A resolver for reqwest that only hands out permitted addresses.
    pub fn resolver(self) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver(Arc::new(self)))
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                // 100.64.0.0/10 (carrier-grade NAT, cloud internals) and 0.0.0.0/8.
                || in_net(ip, IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10)
                || a.octets()[0] == 0
        }
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || in_net(
                    ip,
                    IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)),
                    7,
                )
                || in_net(
                    ip,
                    IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)),
                    10,
                )
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Resolves with the system resolver and drops every address the policy
/// does not permit; a name left with none fails to resolve.
#[derive(Debug, Clone)]
pub struct GuardedResolver(Arc<CallbackPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = all
                .into_iter()
                .filter(|a| policy.permits(&host, a.ip()))
                .collect();
            if permitted.is_empty() {
                return Err(format!(
                    "{host} resolves only to internal addresses; the source's callback_allow must name it"
                )
                .into());
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let p = CallbackPolicy::new(&[]).unwrap();
        for url in [
            "http://127.0.0.1:9090/metrics",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/cb",
            "http://192.168.1.1/cb",
            "http://[::1]/cb",
            "http://[::ffff:127.0.0.1]/cb",
            "http://0.0.0.0:8080/",
            "http://localhost:9090/",
            "http://100.100.100.200/",
            "http://[fd00::1]/",
        ] {
            assert!(p.check_url(url).is_err(), "{url}");
        }
        for url in [
            "https://oms.example.com/cb",
            "http://93.184.216.34/cb",
            "https://[2606:2800:220:1::1]/",
        ] {
            assert!(p.check_url(url).is_ok(), "{url}");
        }
        let allow = CallbackPolicy::new(&[
            "10.0.0.0/8".into(),
            "127.0.0.1".into(),
            "oms.internal".into(),
        ])
        .unwrap();
        assert!(allow.check_url("http://10.9.9.9/cb").is_ok());
        assert!(allow.check_url("http://127.0.0.1:8081/cb").is_ok());
        assert!(allow.check_url("http://192.168.1.1/cb").is_err());
        assert!(allow.permits("oms.internal", "172.16.0.5".parse().unwrap()));
        assert!(!allow.permits("other.internal", "172.16.0.5".parse().unwrap()));
        assert!(
            CallbackPolicy::new(&["10.0.0.0/33".into(), "a b".into()])
                .unwrap_err()
                .len()
                == 2
        );
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_when_sending() {
        use reqwest::dns::Resolve;
        let r = CallbackPolicy::new(&[]).unwrap().resolver();
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(r.resolve(name).await.is_err());
        let r = CallbackPolicy::new(&["localhost".into()])
            .unwrap()
            .resolver();
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(r.resolve(name).await.is_ok());
    }
}
