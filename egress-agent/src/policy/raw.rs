//! The YAML as read, before validation: loose structs that take what serde can check.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// An item of a list in the policy, which may be refused as it is read.
pub(super) trait Item: DeserializeOwned {
    /// The stand-in for an item refused as it was read: validation skips it.
    fn reported() -> Self;
}

impl Item for RawEntry {
    fn reported() -> Self {
        RawEntry {
            reported: true,
            ..RawEntry::default()
        }
    }
}

impl Item for RawPreset {
    fn reported() -> Self {
        RawPreset {
            reported: true,
            ..RawPreset::default()
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `mode`, `allow`, `presets`, `api_server`, `cluster_cidrs` and `dns`"
)]
pub(super) struct RawPolicy {
    pub(super) mode: Option<String>,
    pub(super) allow: Option<Vec<RawEntry>>,
    pub(super) presets: Option<Vec<RawPreset>>,
    pub(super) api_server: Option<String>,
    pub(super) cluster_cidrs: Option<Vec<String>>,
    pub(super) dns: Option<RawDns>,
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with the preset's `name` and its parameters"
)]
pub(super) struct RawPreset {
    pub(super) name: String,
    pub(super) location: Option<String>,
    /// Refused already, as it was read: validation skips it.
    #[serde(skip)]
    pub(super) reported: bool,
}

/// Numbers are `Option<u32>` with [`present`], so that a bare `min_ttl:` is refused rather
/// than taken as the default.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `resolvers`, `min_ttl`, `max_ttl`, `max_ips_per_name` and `max_ips`"
)]
pub(super) struct RawDns {
    #[serde(default, deserialize_with = "present")]
    pub(super) resolvers: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub(super) min_ttl: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    pub(super) max_ttl: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    pub(super) max_ips_per_name: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    pub(super) max_ips: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `cidr`, `fqdn` or `cidrs_from`, and optionally `ports`"
)]
pub(super) struct RawEntry {
    pub(super) cidr: Option<String>,
    pub(super) fqdn: Option<String>,
    /// A file of prefixes, one a line (see `prefix_list`).
    pub(super) cidrs_from: Option<String>,
    /// `Some(None)` is a bare `ports:`, which must not be mistaken for an omitted `ports`
    /// (every port).
    #[serde(default, deserialize_with = "present")]
    pub(super) ports: Option<Option<Vec<String>>>,
    /// Refused already, as it was read: validation skips it.
    #[serde(skip)]
    pub(super) reported: bool,
}

/// Marks a key as present even when its value is null.
pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}
