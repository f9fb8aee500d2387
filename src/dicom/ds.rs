//! Decimal String (DS) formatting: at most 16 characters per value, as much precision as fits.
//! Owns number → text only; never writes a non-finite value (that is an error, not "NaN").

use thiserror::Error;

/// Maximum length of one DS value (PS3.5 §6.2).
pub const DS_MAX_LEN: usize = 16;

#[derive(Debug, Error, PartialEq)]
pub enum DsError {
    #[error("cannot write {0} as a DICOM decimal string (DS): not a finite number")]
    NotFinite(f64),
}

/// Format one value as DS: the shortest round-trip text if it fits in 16 characters, otherwise
/// the fixed or scientific rendering that keeps the most significant digits within 16.
pub fn format_ds(v: f64) -> Result<String, DsError> {
    if !v.is_finite() {
        return Err(DsError::NotFinite(v));
    }
    if v == 0.0 {
        return Ok("0".to_string());
    }
    // Shortest representations that round-trip exactly.
    let plain = format!("{v}");
    let sci = format!("{v:e}");
    let best_exact = if plain.len() <= sci.len() { plain } else { sci };
    if best_exact.len() <= DS_MAX_LEN {
        return Ok(best_exact);
    }
    // Lose precision gracefully: try 16, 15, ... significant digits.
    let exp10 = v.abs().log10().floor() as i32;
    for digits in (1..=16i32).rev() {
        let mut candidates = Vec::with_capacity(2);
        let decimals = digits - 1 - exp10;
        if decimals >= 0 && exp10 < 16 {
            candidates.push(trim_fixed(format!("{:.*}", decimals as usize, v)));
        }
        candidates.push(trim_sci(format!("{:.*e}", (digits - 1) as usize, v)));
        if let Some(c) = candidates
            .into_iter()
            .filter(|c| c.len() <= DS_MAX_LEN && c.parse::<f64>().is_ok_and(f64::is_finite))
            .min_by_key(|c| c.len())
        {
            return Ok(c);
        }
    }
    // Unreachable for finite values (1 significant digit in scientific form is ≤ 7 chars).
    Ok(format!("{:.0e}", v))
}

/// Format several values as one backslash-separated DS value list.
pub fn format_ds_multi(values: &[f64]) -> Result<String, DsError> {
    Ok(format_ds_vec(values)?.join("\\"))
}

/// Format several values, one string per value (for multi-valued DS elements).
pub fn format_ds_vec(values: &[f64]) -> Result<Vec<String>, DsError> {
    values.iter().map(|&v| format_ds(v)).collect()
}

fn trim_fixed(s: String) -> String {
    if s.contains('.') {
        let t = s.trim_end_matches('0').trim_end_matches('.');
        if t == "-0" {
            "0".to_string()
        } else {
            t.to_string()
        }
    } else {
        s
    }
}

fn trim_sci(s: String) -> String {
    match s.split_once('e') {
        Some((m, e)) if m.contains('.') => {
            format!("{}e{}", m.trim_end_matches('0').trim_end_matches('.'), e)
        }
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(v: f64, rel: f64) -> String {
        let s = format_ds(v).unwrap();
        assert!(s.len() <= DS_MAX_LEN, "{v} -> {s:?} is {} chars", s.len());
        assert!(s.bytes().all(|b| b"0123456789+-Ee.".contains(&b)), "{s:?} has a non-DS character");
        let back: f64 = s.parse().unwrap();
        let err = if v == 0.0 { back.abs() } else { ((back - v) / v).abs() };
        assert!(err <= rel, "{v} -> {s} -> {back} (rel err {err})");
        s
    }

    #[test]
    fn extremes_fit_and_keep_precision() {
        assert_eq!(check(1e-20, 0.0), "1e-20");
        assert_eq!(check(1e20, 0.0), "1e20");
        let s = check(-123456.789012345, 5e-14);
        assert_eq!(s, "-123456.78901235"); // 14 significant digits, correctly rounded
                                           // 0.30000000000000004 needs 19 chars: must be shortened, and shortened to the nearest.
        assert_eq!(check(0.1 + 0.2, 1e-15), "0.3");
        check(std::f64::consts::PI, 1e-14);
        check(-std::f64::consts::E * 1e-7, 1e-10);
        check(f64::MAX, 1e-8); // rounding up would overflow to inf: it must not
        check(f64::MIN_POSITIVE, 1e-8);
        check(-1.0 / 3.0, 1e-12); // 13 digits fit after "-0."
        assert_eq!(check(0.5, 0.0), "0.5");
        assert_eq!(check(-120.0, 0.0), "-120");
        assert_eq!(check(0.0, 0.0), "0");
        assert_eq!(check(-0.0, 0.0), "0");
    }

    #[test]
    fn non_finite_is_an_error() {
        assert!(matches!(format_ds(f64::NAN), Err(DsError::NotFinite(_))));
        assert!(format_ds(f64::INFINITY).is_err());
        assert!(format_ds_multi(&[1.0, f64::NEG_INFINITY]).is_err());
    }

    #[test]
    fn multi_values_joined() {
        assert_eq!(format_ds_multi(&[1.0, -0.5, 1e-20]).unwrap(), "1\\-0.5\\1e-20");
    }
}
