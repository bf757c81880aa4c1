//! Shared Istio value types: string matches, percentages, durations, destinations, header
//! operations. Field names mirror the Istio protos (lowerCamel in YAML).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `StringMatch`: exactly one of `exact`, `prefix`, `regex`; none of them means "present".
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    /// Byte equality, case-sensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Starts-with, case-sensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// RE2 pattern matched against the whole input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// `Percent{value}` in [0, 100].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    /// The percentage, a double in [0, 100].
    #[serde(default)]
    pub value: f64,
}

impl Percent {
    /// Envoy's fractional-percent conversion: parts per million, `trunc(value * 10000)`.
    pub fn per_million(self) -> u32 {
        (self.value.clamp(0.0, 100.0) * 10_000.0).trunc() as u32
    }
}

/// A protobuf/Go duration string (`1h`, `1m30s`, `0.5s`, `250ms`), kept with its original text
/// so diagnostics and dumps show what the user wrote.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub StdDuration);

impl Duration {
    /// Parse `1h`, `1m`, `1s`, `1ms`, `1us`, `1ns`, fractions (`0.5s`) and sums (`1m30s`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("empty duration".into());
        }
        if t.starts_with('-') {
            return Err(format!("negative duration `{s}`"));
        }
        let mut rest = t;
        let mut total = 0f64;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("duration `{s}` has no unit (use e.g. `1s`, `250ms`)"))?;
            let (num, tail) = rest.split_at(num_end);
            let value: f64 = num
                .parse()
                .map_err(|_| format!("invalid number in duration `{s}`"))?;
            let unit_end = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, next) = tail.split_at(unit_end);
            let scale = match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                "us" | "µs" => 1e-6,
                "ns" => 1e-9,
                _ => return Err(format!("unknown unit `{unit}` in duration `{s}`")),
            };
            total += value * scale;
            rest = next;
        }
        if !total.is_finite() || total > 315_576_000_000.0 {
            return Err(format!("duration `{s}` is out of range"));
        }
        Ok(Duration(StdDuration::from_secs_f64(total)))
    }

    /// The standard-library value.
    pub fn get(self) -> StdDuration {
        self.0
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.as_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}s", d.as_secs_f64())
        }
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `PortSelector{number}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    /// Port number on the destination service.
    pub number: u32,
}

/// `Destination{host, subset, port}`: a service in the registry, optionally narrowed.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// Registry host; short names expand against the config's namespace.
    pub host: String,
    /// Subset name defined by a DestinationRule for the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Port on the destination service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

/// `HeaderOperations{set, add, remove}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    /// Replace all values (add if absent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append a value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Delete all values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// `Headers{request, response}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    /// Operations on the request sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    /// Operations on the response sent downstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

/// `WorkloadSelector{labels}`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must carry (all of them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Does `labels` contain every pair of `selector`?
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_istio() {
        assert_eq!(
            Duration::parse("1h").unwrap().get(),
            StdDuration::from_secs(3600)
        );
        assert_eq!(
            Duration::parse("0.5s").unwrap().get(),
            StdDuration::from_millis(500)
        );
        assert_eq!(
            Duration::parse("250ms").unwrap().get(),
            StdDuration::from_millis(250)
        );
        assert_eq!(
            Duration::parse("1m30s").unwrap().get(),
            StdDuration::from_secs(90)
        );
        assert!(Duration::parse("3").is_err());
        assert!(Duration::parse("3x").is_err());
        assert!(Duration::parse("-1s").is_err());
        assert_eq!(Duration::parse("250ms").unwrap().to_string(), "250ms");
    }

    #[test]
    fn percent_is_parts_per_million_truncated() {
        assert_eq!(Percent { value: 50.0 }.per_million(), 500_000);
        assert_eq!(Percent { value: 0.00005 }.per_million(), 0);
        assert_eq!(Percent { value: 100.0 }.per_million(), 1_000_000);
    }
}
