//! Where upstream requests may go: the proxy's defence against server-side request forgery.
//!
//! An upstream (or anything that can answer in its place) chooses where the proxy connects next:
//! with a redirect, with a token realm in a `WWW-Authenticate` challenge, or with a DNS name that
//! resolves to an internal address. Without a guard, an anonymous client could make the proxy
//! fetch from a loopback admin port, a cluster-internal service or the cloud metadata endpoint,
//! and hand the answer back. The rules:
//!
//! * [`classify`] sorts addresses: *never* (link-local incl. `169.254.169.254`, the unspecified
//!   address, `fd00:ec2::254`, multicast, broadcast: no registry lives there), *internal*
//!   (loopback, RFC 1918, CGNAT `100.64/10`, ULA `fc00::/7`, `0/8`), and public. IPv4-mapped and
//!   NAT64 IPv6 addresses are judged as the IPv4 address they carry.
//! * Internal addresses are reachable only through an *allowed authority*: the `host:port` of a
//!   configured or catalog upstream, or a configured `token_realm_hosts` entry. Operators do run
//!   registries on private addresses; what they configured is trusted, nothing else is.
//! * [`AddressGuard::check_target`] is the string check for a redirect target or a realm URL
//!   (scheme, userinfo, literal addresses, another port of an allowed host name).
//! * [`GuardedResolver`] is the connect-time check: every client the proxy builds for upstreams
//!   resolves names through it, so a name that resolves to an internal address is refused
//!   however it was reached (a redirect, a realm, a catalog host), and DNS rebinding after the
//!   string check does not help. Literal IP addresses never reach a resolver; they are judged
//!   by `check_target`.
//!
//! A refusal is a [`Refusal`], which travels inside reqwest's error chain and is found again by
//! [`find_refusal`].

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use url::{Host, Url};

/// How an address is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AddressClass {
    /// Reachable from any upstream.
    Public,
    /// Loopback, private, CGNAT, ULA: only through an allowed authority.
    Internal,
    /// Link-local (cloud metadata), unspecified, multicast, broadcast: never.
    Never,
}

/// Classifies an address; see the module docs.
pub(crate) fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let o = ip.octets();
    if ip.is_link_local() || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        AddressClass::Never
    } else if ip.is_loopback()
        || ip.is_private()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
    {
        AddressClass::Internal
    } else {
        AddressClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    const EC2_METADATA_V6: [u16; 8] = [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254];
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return classify_v4(Ipv4Addr::new(a, b, c, d));
    }
    if ip.is_unspecified() || ip.is_multicast() || (s[0] & 0xffc0) == 0xfe80 || s == EC2_METADATA_V6
    {
        AddressClass::Never
    } else if ip.is_loopback() || (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfec0 {
        // ULA fc00::/7 and the deprecated site-local fec0::/10.
        AddressClass::Internal
    } else {
        AddressClass::Public
    }
}

/// Why a target was refused. Never carries a path or query (tokens live there in some
/// registries' redirects).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not http(s).
    #[error("scheme {0} is not http(s)")]
    Scheme(String),
    /// `user:password@` in the URL.
    #[error("target carries userinfo")]
    Userinfo,
    /// No host.
    #[error("target has no host")]
    NoHost,
    /// A literal address, or every address a name resolves to, is not allowed.
    #[error("{target} is a {class} address")]
    Address { target: String, class: &'static str },
    /// Another port of a configured host: another service.
    #[error("{target} is another port of a configured host")]
    OtherPort { target: String },
    /// The request kind never follows redirects (`target` is the Location's `host:port`).
    #[error("redirects are not followed for {kind} (redirect to {target})")]
    NotFollowed { kind: &'static str, target: String },
    /// More hops than allowed.
    #[error("too many redirects")]
    TooManyRedirects,
}

impl Refusal {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Refusal::Address { .. } | Refusal::OtherPort { .. } => "address_refused",
            _ => "redirect_refused",
        }
    }
}

fn class_name(c: AddressClass) -> &'static str {
    match c {
        AddressClass::Never => "link-local, metadata or unspecified",
        AddressClass::Internal => "loopback, private or internal",
        AddressClass::Public => "public",
    }
}

/// `host:port` with the scheme's default port made explicit, lower case, IPv6 in brackets.
pub(crate) fn authority(url: &Url) -> Option<String> {
    let host = url.host_str()?.to_ascii_lowercase();
    let port = url.port_or_known_default()?;
    Some(format!("{}:{port}", host.trim_end_matches('.')))
}

/// The authorities (and their host names) that may be reached on internal addresses.
#[derive(Default)]
pub(crate) struct AddressGuard {
    allowed: RwLock<Allowed>,
}

#[derive(Default, Clone)]
struct Allowed {
    /// `host:port`, see [`authority`].
    authorities: HashSet<String>,
    /// The host parts of `authorities` that are names (the resolver lets these resolve to
    /// internal addresses).
    names: HashSet<String>,
}

impl fmt::Debug for AddressGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self
            .allowed
            .read()
            .map(|a| a.authorities.len())
            .unwrap_or(0);
        f.debug_struct("AddressGuard")
            .field("allowed_authorities", &n)
            .finish()
    }
}

impl AddressGuard {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the allowed authorities (`host:port`, see [`authority`]).
    pub(crate) fn set_allowed(&self, authorities: impl IntoIterator<Item = String>) {
        let mut next = Allowed::default();
        for a in authorities {
            next.insert(a);
        }
        if let Ok(mut guard) = self.allowed.write() {
            *guard = next;
        }
    }

    /// Adds one allowed authority (a catalog upstream).
    pub(crate) fn allow(&self, authority: String) {
        if let Ok(mut guard) = self.allowed.write() {
            guard.insert(authority);
        }
    }

    /// Whether `url`'s `host:port` is an allowed authority.
    pub(crate) fn is_allowed(&self, url: &Url) -> bool {
        let Some(a) = authority(url) else {
            return false;
        };
        self.allowed
            .read()
            .map(|g| g.authorities.contains(&a))
            .unwrap_or(false)
    }

    fn name_allowed(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.allowed
            .read()
            .map(|g| g.names.contains(&name))
            .unwrap_or(false)
    }

    /// The string check of a redirect target or realm: http(s), no userinfo; then an allowed
    /// authority passes; a literal address must be public; a name must not be `localhost` or
    /// another port of an allowed host name (which the resolver would let through). Other
    /// names are checked again at connect time by [`GuardedResolver`].
    pub(crate) fn check_target(&self, url: &Url) -> Result<(), Refusal> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refusal::Scheme(url.scheme().to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refusal::Userinfo);
        }
        let target = authority(url).ok_or(Refusal::NoHost)?;
        let ip = match url.host() {
            None => return Err(Refusal::NoHost),
            Some(Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            Some(Host::Domain(_)) => None,
        };
        if let Some(ip) = ip {
            match classify(ip) {
                AddressClass::Public => return Ok(()),
                AddressClass::Internal if self.is_allowed(url) => return Ok(()),
                class => {
                    return Err(Refusal::Address {
                        target,
                        class: class_name(class),
                    })
                }
            }
        }
        if self.is_allowed(url) {
            return Ok(());
        }
        let host = url.host_str().unwrap_or_default().trim_end_matches('.');
        let host = host.to_ascii_lowercase();
        if host == "localhost" || host.ends_with(".localhost") {
            return Err(Refusal::Address {
                target,
                class: class_name(AddressClass::Internal),
            });
        }
        if self.name_allowed(&host) {
            return Err(Refusal::OtherPort { target });
        }
        Ok(())
    }
}

impl Allowed {
    fn insert(&mut self, authority: String) {
        let authority = authority.to_ascii_lowercase();
        if let Some((host, _port)) = authority.rsplit_once(':') {
            if !host.starts_with('[') && host.parse::<IpAddr>().is_err() {
                self.names.insert(host.to_owned());
            }
        }
        self.authorities.insert(authority);
    }
}

/// The DNS resolver of every upstream client: the system resolver, with internal and never
/// addresses removed from the answer unless the name is an allowed host. A name left with no
/// address is refused with a [`Refusal::Address`].
#[derive(Clone, Debug)]
pub(crate) struct GuardedResolver {
    guard: Arc<AddressGuard>,
}

impl GuardedResolver {
    pub(crate) fn new(guard: Arc<AddressGuard>) -> Self {
        GuardedResolver { guard }
    }

    /// The addresses of `name` the proxy may connect to.
    pub(crate) fn filter(
        &self,
        name: &str,
        addrs: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        if self.guard.name_allowed(name) {
            return Ok(addrs);
        }
        let mut refused = None;
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match classify(a.ip()) {
                AddressClass::Public => true,
                class => {
                    refused.get_or_insert(class);
                    false
                }
            })
            .collect();
        match refused {
            Some(class) if kept.is_empty() => Err(Refusal::Address {
                target: name.to_owned(),
                class: class_name(class),
            }),
            _ => Ok(kept),
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let kept = this.filter(&name, addrs)?;
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// The [`Refusal`] somewhere in an error's source chain.
pub(crate) fn find_refusal(e: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r.clone());
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn address_classes() {
        use AddressClass::*;
        for (a, want) in [
            ("8.8.8.8", Public),
            ("2a00:1450::1", Public),
            ("127.0.0.1", Internal),
            ("127.9.9.9", Internal),
            ("10.1.2.3", Internal),
            ("172.16.0.1", Internal),
            ("172.31.255.255", Internal),
            ("172.32.0.1", Public),
            ("192.168.1.1", Internal),
            ("100.64.0.1", Internal),
            ("100.127.255.255", Internal),
            ("100.128.0.1", Public),
            ("0.1.2.3", Internal),
            ("::1", Internal),
            ("fc00::1", Internal),
            ("fdff::1", Internal),
            ("fec0::1", Internal),
            ("169.254.169.254", Never),
            ("169.254.0.1", Never),
            ("0.0.0.0", Never),
            ("255.255.255.255", Never),
            ("224.0.0.1", Never),
            ("::", Never),
            ("fe80::1", Never),
            ("febf::1", Never),
            ("fd00:ec2::254", Never),
            ("::ffff:169.254.169.254", Never),
            ("::ffff:127.0.0.1", Internal),
            ("::ffff:8.8.8.8", Public),
            ("64:ff9b::a9fe:a9fe", Never),
            ("64:ff9b::7f00:1", Internal),
        ] {
            assert_eq!(classify(ip(a)), want, "{a}");
        }
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn guard(allowed: &[&str]) -> Arc<AddressGuard> {
        let g = AddressGuard::new();
        g.set_allowed(allowed.iter().map(|s| s.to_string()));
        g
    }

    #[test]
    fn targets() {
        let g = guard(&["127.0.0.1:5000", "registry.internal:443", "[::1]:5000"]);
        // Allowed authorities, whatever their address.
        for ok in [
            "http://127.0.0.1:5000/v2/x",
            "https://registry.internal/x",
            "https://REGISTRY.internal.:443/x",
            "http://[::1]:5000/x",
            "https://cdn.example.com/blob?sig=1",
            "https://8.8.8.8/x",
        ] {
            assert_eq!(g.check_target(&url(ok)), Ok(()), "{ok}");
        }
        for (bad, label) in [
            ("http://127.0.0.1:5001/internal", "address_refused"),
            ("http://127.0.0.2:5000/", "address_refused"),
            ("http://10.0.0.1/", "address_refused"),
            ("http://[::1]:5001/", "address_refused"),
            ("http://169.254.169.254/latest/meta-data", "address_refused"),
            ("http://localhost:5000/", "address_refused"),
            ("http://a.localhost/", "address_refused"),
            ("https://registry.internal:8443/", "address_refused"),
            ("ftp://cdn.example.com/", "redirect_refused"),
            ("https://u:p@cdn.example.com/", "redirect_refused"),
        ] {
            let e = g.check_target(&url(bad)).unwrap_err();
            assert_eq!(e.metric_label(), label, "{bad}: {e}");
            assert!(!e.to_string().contains("p@"), "{e}");
        }
        // Metadata stays refused even when someone configured it.
        let g = guard(&["169.254.169.254:80"]);
        assert!(g
            .check_target(&url("http://169.254.169.254/latest"))
            .is_err());
    }

    fn sa(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 0)
    }

    #[test]
    fn resolver_filters_internal_answers_unless_the_name_is_allowed() {
        let g = guard(&["registry.internal:5000"]);
        let r = GuardedResolver::new(g.clone());
        assert_eq!(
            r.filter("registry.internal", vec![sa("10.0.0.5")]),
            Ok(vec![sa("10.0.0.5")])
        );
        let e = r
            .filter("metadata.google.internal", vec![sa("169.254.169.254")])
            .unwrap_err();
        assert!(e.to_string().contains("metadata"), "{e}");
        assert!(r.filter("evil.example", vec![sa("127.0.0.1")]).is_err());
        assert!(r.filter("evil.example", vec![sa("::1")]).is_err());
        // Mixed answers: only the public address is kept.
        assert_eq!(
            r.filter("mixed.example", vec![sa("10.0.0.1"), sa("8.8.8.8")]),
            Ok(vec![sa("8.8.8.8")])
        );
        // Allowed names are dropped with a reload.
        g.set_allowed(Vec::new());
        assert!(r.filter("registry.internal", vec![sa("10.0.0.5")]).is_err());
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_connect_time() {
        // "localhost" resolves to loopback through the system resolver.
        let r = GuardedResolver::new(guard(&[]));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = match reqwest::dns::Resolve::resolve(&r, name).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(e) => e,
        };
        let refusal = find_refusal(err.as_ref()).expect("a Refusal in the chain");
        assert_eq!(refusal.metric_label(), "address_refused");
        // Allowed as a configured host, it resolves.
        let r = GuardedResolver::new(guard(&["localhost:5000"]));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let addrs = match reqwest::dns::Resolve::resolve(&r, name).await {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => panic!("allowed localhost refused: {e}"),
        };
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
