use std::collections::BTreeSet;

use super::*;

const TUNNEL: &str = "TCP:22 TCP:443 TCP:9000 UDP:1194";
const HTTPS: &str = "TCP:443";
const HTTP: &str = "TCP:80";

/// A preset, its parameters, and the (name, ports) it must expand to.
type Table = (&'static str, Params, Vec<(&'static str, &'static str)>);

/// Every row of every table in `shared/aks-egress-requirements.md`, restated from the
/// file (not from the tables above), with `<location>` and the Dev Spaces name filled in.
fn article() -> Vec<Table> {
    let location = Params {
        location: Some("eastus".into()),
        fqdn: None,
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
                fqdn: None,
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
                fqdn: None,
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
                ("apt.dockerproject.org", HTTPS),
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
            "dev-spaces",
            Params {
                location: None,
                fqdn: Some("azds-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0.westeurope.azds.io".into()),
            },
            vec![
                ("cloudflare.docker.com", HTTPS),
                ("gcr.io", HTTPS),
                ("storage.googleapis.com", HTTPS),
                (
                    "azds-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0.westeurope.azds.io",
                    HTTPS,
                ),
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
        fqdn: None,
    }
}

fn dev_spaces(fqdn: &str) -> Params {
    Params {
        location: None,
        fqdn: Some(fqdn.into()),
    }
}

#[track_caller]
fn assert_refused(name: &str, params: &Params, phrase: &str) {
    let message = expand(name, params).expect_err("should be refused");
    assert!(message.contains(phrase), "missing {phrase:?} in {message}");
}

#[test]
fn each_preset_expands_to_exactly_its_table() {
    for (name, params, rows) in article() {
        let expanded: Vec<(String, String)> = expand(name, &params)
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
        "unknown preset `aks`; expected one of: aks-global, aks-china, aks-government, ubuntu-updates, gpu, azure-monitor, dev-spaces, azure-policy, windows",
    );
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
    assert_refused(
        "dev-spaces",
        &Params {
            location: Some("eastus".into()),
            fqdn: Some("azds-1.eastus.azds.io".into()),
        },
        "`dev-spaces` has no parameter `location`; it takes `fqdn`",
    );
    assert_refused(
        "aks-global",
        &Params {
            location: Some("eastus".into()),
            fqdn: Some("azds-1.eastus.azds.io".into()),
        },
        "`aks-global` has no parameter `fqdn`; it takes `location`",
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
        !expand("aks-global", &location("eastus!"))
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
fn good_location_shapes() {
    for good in [
        "eastus",
        "westeurope",
        "chinaeast2",
        "usgovvirginia",
        "eastus2euap",
    ] {
        assert!(expand("aks-global", &location(good)).is_ok(), "{good}");
    }
}

#[test]
fn dev_spaces_needs_its_controller_name() {
    assert_refused(
        "dev-spaces",
        &Params::default(),
        "`dev-spaces` needs `fqdn`, the controller's `dataplaneFqdn`",
    );
    for bad in [
        "",
        "azds.io",
        "eastus.azds.io",
        "azds-.eastus.azds.io",
        "x-1234.eastus.azds.io",
        "azds-1234.azds.io",
        "azds-1234.East US.azds.io",
        "azds-1234.eastus.azds.io.evil.example",
        "azds-1234.a.eastus.azds.io",
        "azds-12_34.eastus.azds.io",
        "*.eastus.azds.io",
    ] {
        assert_refused(
            "dev-spaces",
            &dev_spaces(bad),
            &format!("`{bad}` is not a Dev Spaces controller name; expected"),
        );
    }
}

#[test]
fn dev_spaces_name_is_normalised() {
    let rules =
        expand("dev-spaces", &dev_spaces("AZDS-ab12.WestEurope.azds.io.")).expect("valid name");
    let last = rules.last().expect("four rules");
    assert_eq!(last.0.to_string(), "azds-ab12.westeurope.azds.io");
}
