//! Configuration helpers shared by every role's command line: values parsed once, at start,
//! into typed settings, with messages that say what was expected.

use std::time::Duration;

/// Parses a duration as the command lines write them: `5s`, `500ms`, `2m`, `1h`, `1.5s`, or a
/// bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("`{text}` is not a duration such as 30s, 2m or 500ms"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is not a duration"))
}

/// `text` as an `http://` or `https://` URL with a host (aggregator report URLs, storage
/// endpoints); `None` for anything else.
pub(crate) fn http_url(text: &str) -> Option<url::Url> {
    url::Url::parse(text).ok().filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

/// Clap value parser: an http(s) URL with a host.
pub(crate) fn parse_http_url(text: &str) -> Result<url::Url, String> {
    http_url(text.trim()).ok_or_else(|| format!("`{text}` is not an http(s) URL like http://host:4371"))
}

/// A duration through [`parse_duration`], refused outside `range`.
pub(crate) fn parse_duration_within(
    text: &str,
    range: &std::ops::RangeInclusive<Duration>,
) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if range.contains(&duration) {
        Ok(duration)
    } else {
        Err(format!("`{text}` must be between {:?} and {:?}", range.start(), range.end()))
    }
}

/// Wraps a clap value parser so its message starts with the environment variable the value
/// may have come from: clap itself names only the flag, and in a pod the value comes from
/// the environment.
pub(crate) fn naming<T, E: std::fmt::Display>(
    variable: &'static str,
    parse: impl Fn(&str) -> Result<T, E> + Clone + Send + Sync + 'static,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |text| parse(text).map_err(|e| format!("{variable}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_need_the_scheme_and_a_host() {
        assert_eq!(http_url("https://agg.example:4371").map(|u| u.scheme().to_owned()), Some("https".into()));
        assert!(http_url("http://10.0.0.1:4371").is_some());
        for bad in ["agg:4371", "ftp://agg", "http://", "unix:/tmp/s", ""] {
            assert!(http_url(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn bounded_durations_say_the_bounds() {
        let range = Duration::from_millis(100)..=Duration::from_secs(600);
        assert_eq!(parse_duration_within("5s", &range), Ok(Duration::from_secs(5)));
        assert!(parse_duration_within("0s", &range).unwrap_err().contains("between 100ms and 600s"));
    }

    #[test]
    fn named_parsers_prefix_the_variable() {
        let parse = naming("DURABLE_SCALER_INTERVAL", parse_duration);
        assert!(parse("soon").unwrap_err().starts_with("DURABLE_SCALER_INTERVAL: "));
        assert_eq!(parse("1s"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(" 30 "), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn bad_durations_say_what_was_expected() {
        assert!(parse_duration("soon").unwrap_err().contains("30s, 2m or 500ms"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit `d`"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1.2.3s").is_err());
    }
}
