//! Source address ranges such as `127.0.0.2-127.0.0.50`.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};

/// Parses `A`, `A-B` (IPv4, inclusive) or a comma-separated list of those.
pub fn parse_range(s: &str) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            None => out.push(part.parse::<IpAddr>()?),
            Some((a, b)) => {
                let a: Ipv4Addr = a.trim().parse()?;
                let b: Ipv4Addr = b.trim().parse()?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 65_536 {
                    bail!("bad range {part:?}");
                }
                out.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
            }
        }
    }
    if out.is_empty() {
        bail!("empty address list {s:?}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let v = parse_range("127.0.0.2-127.0.0.5").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[3], "127.0.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(
            parse_range("127.0.0.9, 127.0.0.1-127.0.0.2").unwrap().len(),
            3
        );
        assert!(parse_range("127.0.0.5-127.0.0.2").is_err());
        assert!(parse_range("").is_err());
    }
}
