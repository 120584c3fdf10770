use std::collections::BTreeSet;

use super::*;

const TUNNEL: &str = "TCP:22 TCP:443 TCP:9000 UDP:1194";
const HTTPS: &str = "TCP:443";
const HTTP: &str = "TCP:80";

/// A preset, its parameters, and the (name, ports) it must expand to.
type Table = (&'static str, Params, Vec<(&'static str, &'static str)>);

/// Every row of every table in `shared/aks-egress-requirements.md`, restated from the
/// file (not from the tables above), with `<location>` filled in. Two departures, each
/// tested on its own below: no Dev Spaces (retired), and `gpu`'s Docker repository.
fn article() -> Vec<Table> {
    let location = Params {
        location: Some("eastus".into()),
    };
    let none = Params::default();
    vec![
        (
            "aks-global",
            location.clone(),
            vec![
                ("*.hcp.eastus.azmk8s.io", TUNNEL),
                ("*.tun.eastus.azmk8s.io", TUNNEL),
                ("*.cdn.mscr.io", HTTPS),
                ("mcr.microsoft.com", HTTPS),
                ("*.data.mcr.microsoft.com", HTTPS),
                ("management.azure.com", HTTPS),
                ("login.microsoftonline.com", HTTPS),
                ("ntp.ubuntu.com", "UDP:123"),
                ("packages.microsoft.com", HTTPS),
                ("acs-mirror.azureedge.net", HTTPS),
            ],
        ),
        (
            "aks-china",
            Params {
                location: Some("chinaeast2".into()),
            },
            vec![
                ("*.hcp.chinaeast2.cx.prod.service.azk8s.cn", TUNNEL),
                ("*.tun.chinaeast2.cx.prod.service.azk8s.cn", TUNNEL),
                ("*.azk8s.cn", HTTPS),
                ("mcr.microsoft.com", HTTPS),
                ("*.cdn.mscr.io", HTTPS),
                ("*.data.mcr.microsoft.com", HTTPS),
                ("management.chinacloudapi.cn", HTTPS),
                ("login.chinacloudapi.cn", HTTPS),
                ("ntp.ubuntu.com", "UDP:123"),
                ("packages.microsoft.com", HTTPS),
            ],
        ),
        (
            "aks-government",
            Params {
                location: Some("usgovvirginia".into()),
            },
            vec![
                (
                    "*.hcp.usgovvirginia.cx.aks.containerservice.azure.us",
                    TUNNEL,
                ),
                (
                    "*.tun.usgovvirginia.cx.aks.containerservice.azure.us",
                    TUNNEL,
                ),
                ("mcr.microsoft.com", HTTPS),
                ("*.cdn.mscr.io", HTTPS),
                ("*.data.mcr.microsoft.com", HTTPS),
                ("management.usgovcloudapi.net", HTTPS),
                ("login.microsoftonline.us", HTTPS),
                ("ntp.ubuntu.com", "UDP:123"),
                ("packages.microsoft.com", HTTPS),
                ("acs-mirror.azureedge.net", HTTPS),
            ],
        ),
        (
            "ubuntu-updates",
            none.clone(),
            vec![
                ("security.ubuntu.com", HTTP),
                ("azure.archive.ubuntu.com", HTTP),
                ("changelogs.ubuntu.com", HTTP),
            ],
        ),
        (
            "gpu",
            none.clone(),
            vec![
                ("nvidia.github.io", HTTPS),
                ("us.download.nvidia.com", HTTPS),
                ("download.docker.com", HTTPS),
            ],
        ),
        (
            "azure-monitor",
            none.clone(),
            vec![
                ("dc.services.visualstudio.com", HTTPS),
                ("*.ods.opinsights.azure.com", HTTPS),
                ("*.oms.opinsights.azure.com", HTTPS),
                ("*.microsoftonline.com", HTTPS),
                ("*.monitoring.azure.com", HTTPS),
            ],
        ),
        (
            "azure-policy",
            location,
            vec![
                ("gov-prod-policy-data.trafficmanager.net", HTTPS),
                ("raw.githubusercontent.com", HTTPS),
                ("*.gk.eastus.azmk8s.io", HTTPS),
                ("dc.services.visualstudio.com", HTTPS),
            ],
        ),
        (
            "windows",
            none,
            vec![
                ("onegetcdn.azureedge.net", HTTPS),
                ("winlayers.blob.core.windows.net", HTTPS),
                ("winlayers.cdn.mscr.io", HTTPS),
                ("go.microsoft.com", HTTPS),
                ("mp.microsoft.com", HTTP),
                ("www.msftconnecttest.com", HTTP),
                ("ctldl.windowsupdate.com", HTTP),
                ("kms.core.windows.net", "TCP:1688"),
            ],
        ),
    ]
}

fn location(location: &str) -> Params {
    Params {
        location: Some(location.into()),
    }
}

#[track_caller]
fn assert_refused(name: &str, params: &Params, phrase: &str) {
    let message = expand(name, params, None).expect_err("should be refused");
    assert!(message.contains(phrase), "missing {phrase:?} in {message}");
}

#[test]
fn each_preset_expands_to_exactly_its_table() {
    for (name, params, rows) in article() {
        let expanded: Vec<(String, String)> = expand(name, &params, None)
            .expect("valid parameters")
            .iter()
            .map(|(target, ports)| (target.to_string(), ports.to_string()))
            .collect();
        let got: BTreeSet<(String, String)> = expanded.iter().cloned().collect();
        assert_eq!(got.len(), expanded.len(), "{name} repeats a row");
        let want: BTreeSet<(String, String)> = rows
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_string()))
            .collect();
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing {missing:?}, extra {extra:?}"
        );
    }
}

#[test]
fn every_preset_is_in_the_article_tables() {
    let tested: Vec<&str> = article().iter().map(|(name, _, _)| *name).collect();
    let presets: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
    assert_eq!(tested, presets);
}

#[test]
fn only_the_cloud_presets_are_clouds() {
    let clouds: Vec<&str> = PRESETS.iter().filter(|p| p.cloud).map(|p| p.name).collect();
    assert_eq!(clouds, ["aks-global", "aks-china", "aks-government"]);
}

#[test]
fn platform_addresses() {
    let rules: Vec<String> = platform()
        .iter()
        .map(|(target, ports)| format!("{target} {ports}"))
        .collect();
    assert_eq!(rules, ["168.63.129.16/32 any", "169.254.169.254/32 TCP:80"]);
}

#[test]
fn unknown_preset_lists_the_valid_names() {
    assert_refused(
        "aks",
        &Params::default(),
        "unknown preset `aks`; expected one of: aks-global, aks-china, aks-government, ubuntu-updates, gpu, azure-monitor, azure-policy, windows",
    );
}

#[test]
fn retired_presets_say_why() {
    assert_refused(
        "dev-spaces",
        &Params::default(),
        "preset `dev-spaces` is no longer offered: Azure Dev Spaces was retired on 31 October 2023",
    );
}

#[test]
fn gpu_uses_the_docker_repository_that_still_serves() {
    let rules = expand("gpu", &Params::default(), None).expect("no parameters");
    let names: Vec<String> = rules.iter().map(|(t, _)| t.to_string()).collect();
    assert!(names.contains(&"download.docker.com".to_string()));
    assert!(!names.contains(&"apt.dockerproject.org".to_string()));
}

#[test]
fn missing_location() {
    for name in ["aks-global", "aks-china", "aks-government", "azure-policy"] {
        assert_refused(
            name,
            &Params::default(),
            &format!("`{name}` needs `location`, the cluster's Azure region"),
        );
    }
}

#[test]
fn surplus_parameter() {
    assert_refused(
        "gpu",
        &location("eastus"),
        "`gpu` has no parameter `location`; it takes none",
    );
}

#[test]
fn bad_location_shapes() {
    assert_refused(
        "aks-global",
        &location("East US"),
        "location `East US` is not an Azure region name (lowercase letters and digits, e.g. `eastus`, `westeurope`); did you mean `eastus`?",
    );
    assert_refused(
        "aks-global",
        &location("eastus!"),
        "location `eastus!` is not an Azure region name",
    );
    assert!(
        !expand("aks-global", &location("eastus!"), None)
            .expect_err("refused")
            .contains("did you mean")
    );
    assert_refused("aks-global", &location(""), "`location` is empty");
    for bad in ["2eastus", "east-us", "east.us", "eastus.evil.example", "*"] {
        assert_refused(
            "azure-policy",
            &location(bad),
            "is not an Azure region name",
        );
    }
}

#[test]
fn each_cloud_takes_its_own_regions() {
    for (preset, good) in [
        ("aks-global", "eastus"),
        ("aks-global", "westeurope"),
        ("aks-global", "eastus2euap"),
        ("azure-policy", "westus2"),
        ("aks-china", "chinaeast2"),
        ("aks-government", "usgovvirginia"),
    ] {
        assert!(
            expand(preset, &location(good), None).is_ok(),
            "{preset} {good}"
        );
    }
}

#[test]
fn unknown_and_foreign_regions_are_refused() {
    assert_refused(
        "aks-global",
        &location("eastsu"),
        "location `eastsu` is not a region of Azure (global); did you mean `eastus`?",
    );
    assert_refused(
        "azure-policy",
        &location("mars"),
        "location `mars` is not a region of Azure (global); expected one of: ",
    );
    assert_refused(
        "aks-china",
        &location("eastus"),
        "location `eastus` is a region of Azure (global), not of Azure China 21Vianet; use the `aks-global` preset there",
    );
    assert_refused(
        "aks-government",
        &location("chinaeast2"),
        "use the `aks-china` preset there",
    );
}

#[track_caller]
fn expand_with_api_server(preset: &str, region: &str, name: &str) -> Result<Vec<String>, String> {
    expand(preset, &location(region), Some(name))
        .map(|rules| rules.iter().map(|(t, p)| format!("{t} {p}")).collect())
}

#[test]
fn a_known_api_server_replaces_the_regional_wildcard() {
    for (preset, region, name, regional) in [
        (
            "aks-global",
            "eastus",
            "myaks-dns-4f1e2d3c.hcp.eastus.azmk8s.io",
            "*.hcp.eastus.azmk8s.io",
        ),
        (
            "aks-global",
            "eastus",
            "myaks-dns-4f1e2d3c.0a1b2c3d-e4f5-4a6b-8c7d-9e0f1a2b3c4d.privatelink.eastus.azmk8s.io",
            "*.hcp.eastus.azmk8s.io",
        ),
        (
            "aks-china",
            "chinaeast2",
            "myaks.hcp.chinaeast2.cx.prod.service.azk8s.cn",
            "*.hcp.chinaeast2.cx.prod.service.azk8s.cn",
        ),
        (
            "aks-government",
            "usgovvirginia",
            "myaks.privatelink.usgovvirginia.cx.aks.containerservice.azure.us",
            "*.hcp.usgovvirginia.cx.aks.containerservice.azure.us",
        ),
    ] {
        let rules = expand_with_api_server(preset, region, name).expect("fits the region");
        assert!(rules.contains(&format!("{name} {TUNNEL}")), "{rules:?}");
        assert!(
            !rules.iter().any(|r| r.starts_with(regional)),
            "{regional} kept: {rules:?}"
        );
        let preset = find(preset).expect("a preset");
        assert_eq!(
            regional_api_servers(preset, region).as_deref(),
            Some(regional)
        );
    }
}

#[test]
fn the_tunnel_row_stays_with_a_known_api_server() {
    let rules =
        expand_with_api_server("aks-global", "eastus", "a.hcp.eastus.azmk8s.io").expect("fits");
    assert!(rules.contains(&format!("*.tun.eastus.azmk8s.io {TUNNEL}")));
}

#[test]
fn an_api_server_of_another_region_or_form_is_refused() {
    for name in [
        "myaks.hcp.westus.azmk8s.io",
        "hcp.eastus.azmk8s.io",
        "myaks.tun.eastus.azmk8s.io",
        "myaks.hcp.eastus.cx.prod.service.azk8s.cn",
        "example.com",
    ] {
        assert_eq!(
            expand_with_api_server("aks-global", "eastus", name).expect_err("refused"),
            format!(
                "API server `{name}` is not a cluster's API server in eastus: expected `<cluster>.hcp.eastus.azmk8s.io`, or for a private cluster `<cluster>.privatelink.eastus.azmk8s.io`"
            )
        );
    }
}

#[test]
fn presets_without_the_regional_row_ignore_the_api_server() {
    assert_eq!(
        regional_api_servers(find("azure-policy").expect("a preset"), "eastus"),
        None
    );
    let with = expand(
        "azure-policy",
        &location("eastus"),
        Some("a.hcp.eastus.azmk8s.io"),
    );
    assert_eq!(with, expand("azure-policy", &location("eastus"), None));
}
