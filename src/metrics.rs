//! What every role's Prometheus metrics share: label values spelled by enums, and the
//! OpenMetrics text every `/metrics` endpoint serves.
//!
//! Naming: `durable_scaler_<role>_<thing>[_<unit>]`, counters ending in `_total` (which
//! prometheus-client appends), the role being the process that serves the series
//! (`aggregator`, `sidecar`, `webhook`); the README's "Metrics" section lists them all.

use prometheus_client::registry::Registry;

/// The Content-Type of [`encode`]'s output.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text exposition of `registry`.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// An enum whose values are metric label values (implemented by [`label_values!`]).
pub(crate) trait LabelValue: Copy {
    /// This value as a metric label.
    fn label(self) -> &'static str;
}

/// Spells each variant of a field-less enum as a metric label value: gives it
/// `label(self) -> &'static str` ([`LabelValue`], and the same as an inherent method) and
/// prometheus-client's `EncodeLabelValue`, so the enum itself goes into a label set and no
/// label is ever built from a string at the call site.
macro_rules! label_values {
    ($enum:ty { $($variant:ident => $label:literal),+ $(,)? }) => {
        impl $enum {
            /// This value as a metric label.
            pub(crate) const fn label(self) -> &'static str {
                match self {
                    $(<$enum>::$variant => $label,)+
                }
            }
        }

        impl $crate::metrics::LabelValue for $enum {
            fn label(self) -> &'static str {
                <$enum>::label(self)
            }
        }

        impl prometheus_client::encoding::EncodeLabelValue for $enum {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.label())
            }
        }
    };
}
pub(crate) use label_values;

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::{counter::Counter, family::Family};

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Colour {
        DarkRed,
        Blue,
    }
    label_values!(Colour { DarkRed => "dark_red", Blue => "blue" });

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Labels {
        colour: Colour,
    }

    #[test]
    fn an_enum_label_is_encoded_as_its_spelling() {
        let mut registry = Registry::with_prefix("durable_scaler_test");
        let family = Family::<Labels, Counter>::default();
        registry.register("paints", "Paints", family.clone());
        family.get_or_create(&Labels { colour: Colour::DarkRed }).inc();
        assert_eq!(Colour::Blue.label(), "blue");
        let text = encode(&registry);
        assert!(text.contains("durable_scaler_test_paints_total{colour=\"dark_red\"} 1\n"), "{text}");
    }
}
