//! The one wall-clock helper: UTC now as ISO 8601 (records, logs) or as DICOM DA/TM values,
//! from the system clock without a date crate (Howard Hinnant's civil-from-days algorithm).
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A UTC instant split into the calendar fields the formats below need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub micros: u32,
}

impl UtcTime {
    /// The instant `since_epoch` after 1970-01-01T00:00:00Z.
    pub fn from_unix(since_epoch: Duration) -> UtcTime {
        let secs = since_epoch.as_secs() as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        UtcTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            micros: since_epoch.subsec_micros(),
        }
    }

    /// Now; a clock before 1970 reads as the epoch.
    pub fn now() -> UtcTime {
        UtcTime::from_unix(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default())
    }

    /// "YYYY-MM-DDTHH:MM:SSZ".
    pub fn iso(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// DICOM DA ("YYYYMMDD") and TM ("HHMMSS.FFFFFF").
    pub fn dicom_date_time(&self) -> (String, String) {
        (
            format!("{:04}{:02}{:02}", self.year, self.month, self.day),
            format!("{:02}{:02}{:02}.{:06}", self.hour, self.minute, self.second, self.micros),
        )
    }
}

/// UTC now as "YYYY-MM-DDTHH:MM:SSZ".
pub fn utc_now() -> String {
    UtcTime::now().iso()
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
    }

    #[test]
    fn formats() {
        // 2026-12-05T06:07:08.000009Z
        let t = UtcTime::from_unix(Duration::new(20_792 * 86_400 + 6 * 3600 + 7 * 60 + 8, 9_000));
        assert_eq!(t.iso(), "2026-12-05T06:07:08Z");
        assert_eq!(t.dicom_date_time(), ("20261205".to_string(), "060708.000009".to_string()));
        let now = utc_now();
        assert_eq!(now.len(), 20);
        assert!(now.starts_with("20") && now.ends_with('Z'));
    }
}
