//! The Azure regions of each cloud, so that a mistyped `location` is refused instead of
//! becoming a name such as `*.hcp.mars.azmk8s.io` that never resolves.
//!
//! The articles in `shared/seeds/` write the region only as `<location>` (and
//! `shared/aks-egress-requirements.md` gives `eastus`, `westeurope`, `chinaeast2` and
//! `usgovvirginia` as examples), so the lists are Azure's own: the `name` column of
//! `az account list-locations` in each cloud (`az cloud set --name AzureCloud`,
//! `AzureChinaCloud`, `AzureUSGovernment`), physical regions only, as of 2025. When Azure
//! opens a region, add it here: until then a policy for it is refused with this list.

use std::fmt;

/// One of the three Azure clouds, each with its own regions and its own AKS zones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// Azure (global), the public cloud.
    Global,
    /// Azure China, operated by 21Vianet.
    China,
    /// Azure Government (US).
    Government,
}

impl Cloud {
    const ALL: [Cloud; 3] = [Cloud::Global, Cloud::China, Cloud::Government];

    /// The regions' names, as they go into DNS names.
    pub fn regions(self) -> &'static [&'static str] {
        match self {
            Cloud::Global => GLOBAL,
            Cloud::China => CHINA,
            Cloud::Government => GOVERNMENT,
        }
    }

    /// The zone below the region in the names of this cloud's AKS API servers, as in
    /// `<cluster>.hcp.<location>.<zone>` and `<cluster>.privatelink.<location>.<zone>`.
    pub fn aks_zone(self) -> &'static str {
        match self {
            Cloud::Global => "azmk8s.io",
            Cloud::China => "cx.prod.service.azk8s.cn",
            Cloud::Government => "cx.aks.containerservice.azure.us",
        }
    }

    /// The preset of this cloud's required egress.
    pub fn preset(self) -> &'static str {
        match self {
            Cloud::Global => "aks-global",
            Cloud::China => "aks-china",
            Cloud::Government => "aks-government",
        }
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cloud::Global => "Azure (global)",
            Cloud::China => "Azure China 21Vianet",
            Cloud::Government => "Azure Government",
        })
    }
}

/// Azure (global), including the two early-access (`euap`) regions AKS also runs in.
const GLOBAL: &[&str] = &[
    "australiacentral",
    "australiacentral2",
    "australiaeast",
    "australiasoutheast",
    "austriaeast",
    "belgiumcentral",
    "brazilsouth",
    "brazilsoutheast",
    "canadacentral",
    "canadaeast",
    "centralindia",
    "centralus",
    "centraluseuap",
    "chilecentral",
    "eastasia",
    "eastus",
    "eastus2",
    "eastus2euap",
    "francecentral",
    "francesouth",
    "germanynorth",
    "germanywestcentral",
    "indonesiacentral",
    "israelcentral",
    "italynorth",
    "japaneast",
    "japanwest",
    "jioindiacentral",
    "jioindiawest",
    "koreacentral",
    "koreasouth",
    "malaysiawest",
    "mexicocentral",
    "newzealandnorth",
    "northcentralus",
    "northeurope",
    "norwayeast",
    "norwaywest",
    "polandcentral",
    "qatarcentral",
    "southafricanorth",
    "southafricawest",
    "southcentralus",
    "southeastasia",
    "southindia",
    "spaincentral",
    "swedencentral",
    "swedensouth",
    "switzerlandnorth",
    "switzerlandwest",
    "taiwannorth",
    "taiwannorthwest",
    "uaecentral",
    "uaenorth",
    "uksouth",
    "ukwest",
    "westcentralus",
    "westeurope",
    "westindia",
    "westus",
    "westus2",
    "westus3",
];

/// Azure China 21Vianet.
const CHINA: &[&str] = &[
    "chinaeast",
    "chinaeast2",
    "chinaeast3",
    "chinanorth",
    "chinanorth2",
    "chinanorth3",
];

/// Azure Government, with the Department of Defense regions (`usgoviowa` is retired).
const GOVERNMENT: &[&str] = &[
    "usdodcentral",
    "usdodeast",
    "usgovarizona",
    "usgovtexas",
    "usgovvirginia",
];

/// Checks that `location` is a region of `cloud`. The error says what it is instead: a
/// region of another cloud (and which preset that takes), or a near miss of a real one.
pub fn check(location: &str, cloud: Cloud) -> Result<(), String> {
    if cloud.regions().contains(&location) {
        return Ok(());
    }
    if let Some(other) = Cloud::ALL
        .into_iter()
        .find(|c| c.regions().contains(&location))
    {
        return Err(format!(
            "location `{location}` is a region of {other}, not of {cloud}; use the `{}` preset there, or a region of {cloud}: {}",
            other.preset(),
            cloud.regions().join(", ")
        ));
    }
    let suggestion = match nearest(location, cloud) {
        Some(near) => format!("did you mean `{near}`?"),
        None => format!("expected one of: {}", cloud.regions().join(", ")),
    };
    Err(format!(
        "location `{location}` is not a region of {cloud}; {suggestion}"
    ))
}

/// The region of `cloud` closest to `location` by edit distance (a swapped pair of letters
/// counts once), if it is close enough to be a typo: at most two edits, and fewer than half
/// the name.
fn nearest(location: &str, cloud: Cloud) -> Option<&'static str> {
    cloud
        .regions()
        .iter()
        .map(|&region| (strsim::damerau_levenshtein(location, region), region))
        .filter(|&(distance, _)| distance <= 2 && distance * 2 < location.len())
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, region)| region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cloud_has_its_example_region() {
        check("eastus", Cloud::Global).expect("global");
        check("westeurope", Cloud::Global).expect("global");
        check("chinaeast2", Cloud::China).expect("china");
        check("usgovvirginia", Cloud::Government).expect("government");
    }

    #[test]
    fn lists_are_sorted_lowercase_and_apart() {
        for cloud in Cloud::ALL {
            let regions = cloud.regions();
            assert!(regions.is_sorted(), "{cloud} is not sorted");
            assert!(regions.windows(2).all(|w| w[0] != w[1]), "{cloud} repeats");
            for region in regions {
                assert!(
                    region
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                    "{region}"
                );
                let others = Cloud::ALL.into_iter().filter(|&c| c != cloud);
                for other in others {
                    assert!(!other.regions().contains(region), "{region} in two clouds");
                }
            }
        }
    }

    #[test]
    fn a_made_up_region_is_refused_with_the_list() {
        let message = check("mars", Cloud::Global).expect_err("refused");
        assert!(
            message.starts_with(
                "location `mars` is not a region of Azure (global); expected one of: australiacentral, "
            ),
            "{message}"
        );
    }

    #[test]
    fn a_typo_gets_a_did_you_mean() {
        for (typo, region) in [
            ("eastsu", "eastus"),
            ("westeruope", "westeurope"),
            ("westuss", "westus"),
        ] {
            assert_eq!(
                check(typo, Cloud::Global).expect_err("refused"),
                format!(
                    "location `{typo}` is not a region of Azure (global); did you mean `{region}`?"
                )
            );
        }
        assert_eq!(
            check("chinaest2", Cloud::China).expect_err("refused"),
            "location `chinaest2` is not a region of Azure China 21Vianet; did you mean `chinaeast2`?"
        );
    }

    #[test]
    fn a_region_of_another_cloud_names_its_preset() {
        assert_eq!(
            check("eastus", Cloud::China).expect_err("refused"),
            "location `eastus` is a region of Azure (global), not of Azure China 21Vianet; use the `aks-global` preset there, or a region of Azure China 21Vianet: chinaeast, chinaeast2, chinaeast3, chinanorth, chinanorth2, chinanorth3"
        );
        let message = check("chinanorth", Cloud::Government).expect_err("refused");
        assert!(message.contains("use the `aks-china` preset"), "{message}");
        let message = check("usgovtexas", Cloud::Global).expect_err("refused");
        assert!(
            message.contains("use the `aks-government` preset"),
            "{message}"
        );
    }
}
