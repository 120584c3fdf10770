//! How far a wildcard reaches, by the Public Suffix List: `*.com` admits every domain
//! anyone registers under `com`, `*.blob.core.windows.net` every storage account any Azure
//! customer creates.

use psl::Type;

use super::types::NamePattern;

/// What a name pattern admits, beside the names its author owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Names below one registrable domain, or one exact name.
    Owned,
    /// Every name below a suffix of the list's private section, where a provider lets
    /// anyone create names: `azurewebsites.net`, `blob.core.windows.net`.
    MultiTenant(String),
    /// Every domain registered below a public suffix (the list's ICANN section, or a
    /// top-level domain it does not know, as its default rule has it).
    PublicSuffix(String),
}

/// How far `pattern` reaches. Only a wildcard whose zone is itself a suffix reaches past
/// one owner; `*.example.com` and exact names never do.
pub fn reach(pattern: &NamePattern) -> Reach {
    let NamePattern::Wildcard(zone) = pattern else {
        return Reach::Owned;
    };
    match psl::suffix(zone.as_bytes()) {
        Some(suffix) if suffix.as_bytes() == zone.as_bytes() => {
            if suffix.typ() == Some(Type::Private) {
                Reach::MultiTenant(zone.clone())
            } else {
                Reach::PublicSuffix(zone.clone())
            }
        }
        _ => Reach::Owned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wildcard(zone: &str) -> NamePattern {
        NamePattern::Wildcard(zone.to_string())
    }

    #[test]
    fn public_suffixes() {
        for zone in ["com", "co.uk", "uk", "io", "cn", "net", "github.io"] {
            let want = if zone == "github.io" {
                Reach::MultiTenant(zone.into())
            } else {
                Reach::PublicSuffix(zone.into())
            };
            assert_eq!(reach(&wildcard(zone)), want, "{zone}");
        }
    }

    #[test]
    fn unknown_top_level_domains_count_as_public() {
        assert_eq!(
            reach(&wildcard("internal")),
            Reach::PublicSuffix("internal".into())
        );
        assert_eq!(reach(&wildcard("corp.internal")), Reach::Owned);
    }

    #[test]
    fn multi_tenant_suffixes() {
        for zone in ["blob.core.windows.net", "azurewebsites.net"] {
            assert_eq!(
                reach(&wildcard(zone)),
                Reach::MultiTenant(zone.into()),
                "{zone}"
            );
        }
    }

    #[test]
    fn names_below_one_owner() {
        for zone in [
            "example.com",
            "microsoft.com",
            "data.mcr.microsoft.com",
            "hcp.eastus.azmk8s.io",
            "mystorage.blob.core.windows.net",
            "myapp.azurewebsites.net",
            "example.co.uk",
        ] {
            assert_eq!(reach(&wildcard(zone)), Reach::Owned, "{zone}");
        }
        assert_eq!(reach(&NamePattern::Exact("com".into())), Reach::Owned);
    }
}
