//! Human sizes: `512`, `4K`, `2M`, `10G`, `1T` (powers of 1024; an optional
//! trailing `B` or `iB` is accepted).

use crate::error::{Error, Result};

/// Parse a human size into bytes.
///
/// ```
/// use chainfs::size::parse_size;
/// assert_eq!(parse_size("512").unwrap(), 512);
/// assert_eq!(parse_size("4K").unwrap(), 4096);
/// assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
/// assert_eq!(parse_size("10G").unwrap(), 10 << 30);
/// // Bad input is an error naming what was given, never a panic.
/// let e = parse_size("ten").unwrap_err();
/// assert!(e.to_string().contains("\"ten\" is not a size"));
/// assert!(parse_size("99999999T").is_err()); // overflows u64
/// ```
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| {
        Error::invalid(format!(
            "{s:?} is not a size (examples: 512, 4K, 2M, 10G, 1T)"
        ))
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| Error::invalid(format!("size {s:?} is too large")))
}

/// Format bytes for people, in powers of 1024.
///
/// ```
/// assert_eq!(chainfs::size::human(512), "512 B");
/// assert_eq!(chainfs::size::human(3 << 29), "1.5 GiB");
/// ```
pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
