//! Parsing the arguments of `peer` commands (pure): names, `--allow` rules, durations,
//! endpoints, and the rules a team peer may have.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use kuberaya_gateway::crd::{AllowRule, PortRef};

/// A DNS-1123 label, as Kubernetes names of namespaces and Services are.
pub fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a valid name: lowercase letters, digits and '-', at most 63, not starting or ending with '-'"
        ))
    }
}

/// A WireGuard endpoint: `IPv4:PORT`, `[IPv6]:PORT` or `HOST:PORT`. A bare IPv6 address
/// is refused: without brackets its last group cannot be told from a port.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let hint = "expected HOST:PORT, IPv4:PORT or [IPv6]:PORT";
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!("{s:?}: port 0 ({hint})"));
        }
        return Ok(a.to_string());
    }
    if s.parse::<Ipv6Addr>().is_ok() || s.matches(':').count() > 1 {
        return Err(format!(
            "{s:?}: an IPv6 endpoint goes in brackets with its port, e.g. [{s}]:51820"
        ));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: no port ({hint})"))?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !port_ok || !host_ok {
        return Err(format!("{s:?}: {hint}"));
    }
    Ok(s.to_string())
}

/// `NS`, `NS/SVC` or `NS/SVC:PORT[,PORT...]`.
pub fn parse_allow(s: &str) -> Result<AllowRule, String> {
    let hint = "expected NS, NS/SVC or NS/SVC:PORT[,PORT...]";
    let (ns, rest) = match s.split_once('/') {
        Some((ns, rest)) => (ns, Some(rest)),
        None => (s, None),
    };
    if ns.contains(':') {
        return Err(format!("{s:?}: ports need a Service ({hint})"));
    }
    let namespace = parse_name(ns).map_err(|e| format!("{s:?}: namespace {e} ({hint})"))?;
    let mut rule = AllowRule {
        namespace: Some(namespace),
        service: None,
        ports: None,
    };
    let Some(rest) = rest else { return Ok(rule) };
    let (svc, ports) = match rest.split_once(':') {
        Some((svc, ports)) => (svc, Some(ports)),
        None => (rest, None),
    };
    rule.service = Some(parse_name(svc).map_err(|e| format!("{s:?}: Service {e} ({hint})"))?);
    if let Some(ports) = ports {
        let mut list = Vec::new();
        for p in ports.split(',') {
            let p = p.trim();
            if p.is_empty() {
                return Err(format!("{s:?}: empty port ({hint})"));
            }
            if p.bytes().all(|b| b.is_ascii_digit()) {
                let n: u16 = p
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{s:?}: port {p} is not in 1-65535"))?;
                list.push(PortRef::Number(n));
            } else {
                parse_name(p).map_err(|e| format!("{s:?}: port name {e}"))?;
                list.push(PortRef::Name(p.to_string()));
            }
        }
        rule.ports = Some(list);
    }
    Ok(rule)
}

/// `90s`, `90m`, `12h`, `30d`, `4w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90m, 12h, 30d or 4w"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("{s:?}: unit must be s, m, h, d or w")),
    };
    if n == 0 {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// `ns/svc:80,http` for one rule.
pub fn rule_text(r: &AllowRule, own_namespace: &str) -> String {
    let ns = r.namespace.as_deref().unwrap_or(own_namespace);
    let mut s = ns.to_string();
    if let Some(svc) = &r.service {
        s.push('/');
        s.push_str(svc);
    } else {
        s.push_str("/*");
    }
    if let Some(ports) = &r.ports {
        let p: Vec<String> = ports
            .iter()
            .map(|p| match p {
                PortRef::Number(n) => n.to_string(),
                PortRef::Name(n) => n.clone(),
            })
            .collect();
        s.push(':');
        s.push_str(&p.join(","));
    }
    s
}

/// A team peer (outside the gateway's namespace) may only name its own namespace.
pub fn check_rules(peer_namespace: &str, gateway_namespace: &str, rules: &[AllowRule]) -> Result<(), String> {
    if peer_namespace == gateway_namespace {
        return Ok(());
    }
    for r in rules {
        if let Some(ns) = &r.namespace
            && ns != peer_namespace
        {
            return Err(format!(
                "--allow {}: a team peer in {peer_namespace} reaches only {peer_namespace}; create an admin peer (without -n) to reach other namespaces",
                rule_text(r, peer_namespace)
            ));
        }
    }
    Ok(())
}
