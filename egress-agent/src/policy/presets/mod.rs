//! Built-in presets: the egress an AKS node needs, from the tables of the Azure article
//! "Control egress traffic for cluster nodes in Azure Kubernetes Service (AKS)", as restated
//! in `shared/aks-egress-requirements.md` (checked against the German revision, the newest).
//!
//! A policy names presets instead of copying forty rows; `policy` turns them into rules.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

use super::syntax::{parse_fqdn, parse_ports};
use super::types::{NamePattern, PortRange, Ports, Proto, Target};

mod regions;

pub use regions::Cloud;

/// A built-in preset: rows of one article table, plus parameters filled into them.
#[derive(Debug)]
pub struct Preset {
    pub name: &'static str,
    /// One line for `egress-agent presets`.
    pub description: &'static str,
    pub params: &'static [Param],
    /// The cloud whose regions `location` must name; for the optional groups the global
    /// one, whose zone (`azmk8s.io`) their names are in.
    pub regions: Cloud,
    /// Whether this is one of the three clouds' required sets. A node runs in exactly one
    /// cloud, and these also bring the Azure platform addresses (see [`platform`]).
    pub cloud: bool,
    rows: &'static [Row],
}

/// A table row: names (with placeholders such as `<location>`) sharing one port list.
#[derive(Debug)]
struct Row {
    names: &'static [&'static str],
    ports: &'static [&'static str],
}

/// A value a preset's rows need from the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// The cluster's Azure region, as in `*.hcp.<location>.azmk8s.io`.
    Location,
}

impl Param {
    const ALL: [Param; 1] = [Param::Location];

    /// The key in a `presets` item (and the `presets show` option).
    pub fn key(self) -> &'static str {
        match self {
            Param::Location => "location",
        }
    }

    /// What the rows contain where the value goes.
    fn placeholder(self) -> &'static str {
        match self {
            Param::Location => "<location>",
        }
    }

    fn value(self, params: &Params) -> Option<&str> {
        match self {
            Param::Location => params.location.as_deref(),
        }
    }

    fn check(self, value: &str, preset: &Preset) -> Result<(), String> {
        match self {
            Param::Location => {
                check_location(value).and_then(|()| regions::check(value, preset.regions))
            }
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Param::Location => "the cluster's Azure region, e.g. `eastus`",
        }
    }
}

/// The parameters given to one preset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub location: Option<String>,
}

/// The API server ports of the article's network rules and of its `*.hcp`/`*.tun` rows:
/// HTTPS for clients, and the tunnel between tunnelfront and tunnelend.
pub const API_SERVER_PORTS: &[&str] = &["HTTPS:443", "TCP:22", "TCP:9000", "UDP:1194"];
const HTTPS: &[&str] = &["HTTPS:443"];
const HTTP: &[&str] = &["HTTP:80"];

/// "Required FQDNs — Azure Global".
const AKS_GLOBAL: &[Row] = &[
    Row {
        names: &["*.hcp.<location>.azmk8s.io", "*.tun.<location>.azmk8s.io"],
        ports: API_SERVER_PORTS,
    },
    Row {
        names: &[
            "*.cdn.mscr.io",
            "mcr.microsoft.com",
            "*.data.mcr.microsoft.com",
            "management.azure.com",
            "login.microsoftonline.com",
        ],
        ports: HTTPS,
    },
    Row {
        names: &["ntp.ubuntu.com"],
        ports: &["UDP:123"],
    },
    Row {
        names: &["packages.microsoft.com", "acs-mirror.azureedge.net"],
        ports: HTTPS,
    },
];

/// "Required FQDNs — Azure China 21Vianet" (no `acs-mirror.azureedge.net`).
const AKS_CHINA: &[Row] = &[
    Row {
        names: &[
            "*.hcp.<location>.cx.prod.service.azk8s.cn",
            "*.tun.<location>.cx.prod.service.azk8s.cn",
        ],
        ports: API_SERVER_PORTS,
    },
    Row {
        names: &[
            "*.azk8s.cn",
            "mcr.microsoft.com",
            "*.cdn.mscr.io",
            "*.data.mcr.microsoft.com",
            "management.chinacloudapi.cn",
            "login.chinacloudapi.cn",
        ],
        ports: HTTPS,
    },
    Row {
        names: &["ntp.ubuntu.com"],
        ports: &["UDP:123"],
    },
    Row {
        names: &["packages.microsoft.com"],
        ports: HTTPS,
    },
];

/// "Required FQDNs — Azure Government".
const AKS_GOVERNMENT: &[Row] = &[
    Row {
        names: &[
            "*.hcp.<location>.cx.aks.containerservice.azure.us",
            "*.tun.<location>.cx.aks.containerservice.azure.us",
        ],
        ports: API_SERVER_PORTS,
    },
    Row {
        names: &[
            "mcr.microsoft.com",
            "*.cdn.mscr.io",
            "*.data.mcr.microsoft.com",
            "management.usgovcloudapi.net",
            "login.microsoftonline.us",
        ],
        ports: HTTPS,
    },
    Row {
        names: &["ntp.ubuntu.com"],
        ports: &["UDP:123"],
    },
    Row {
        names: &["packages.microsoft.com", "acs-mirror.azureedge.net"],
        ports: HTTPS,
    },
];

/// "Optional groups": recommended (Ubuntu security updates).
const UBUNTU_UPDATES: &[Row] = &[Row {
    names: &[
        "security.ubuntu.com",
        "azure.archive.ubuntu.com",
        "changelogs.ubuntu.com",
    ],
    ports: HTTP,
}];

/// "Optional groups": GPU nodes. The 2020 article's third row, `apt.dockerproject.org`,
/// was Docker's old package repository, shut down on 31 March 2020 in favour of
/// `download.docker.com`; later revisions of the article list that name instead, and so
/// does this preset: a name that no longer serves is only a hole to keep open.
const GPU: &[Row] = &[Row {
    names: &[
        "nvidia.github.io",
        "us.download.nvidia.com",
        "download.docker.com",
    ],
    ports: HTTPS,
}];

/// "Optional groups": Azure Monitor for containers.
const AZURE_MONITOR: &[Row] = &[Row {
    names: &[
        "dc.services.visualstudio.com",
        "*.ods.opinsights.azure.com",
        "*.oms.opinsights.azure.com",
        "*.microsoftonline.com",
        "*.monitoring.azure.com",
    ],
    ports: HTTPS,
}];

/// "Optional groups": Azure Policy (preview).
const AZURE_POLICY: &[Row] = &[Row {
    names: &[
        "gov-prod-policy-data.trafficmanager.net",
        "raw.githubusercontent.com",
        "*.gk.<location>.azmk8s.io",
        "dc.services.visualstudio.com",
    ],
    ports: HTTPS,
}];

/// "Optional groups": Windows Server nodes (the TCP:1688 row is KMS activation).
const WINDOWS: &[Row] = &[
    Row {
        names: &[
            "onegetcdn.azureedge.net",
            "winlayers.blob.core.windows.net",
            "winlayers.cdn.mscr.io",
            "go.microsoft.com",
        ],
        ports: HTTPS,
    },
    Row {
        names: &[
            "mp.microsoft.com",
            "www.msftconnecttest.com",
            "ctldl.windowsupdate.com",
        ],
        ports: HTTP,
    },
    Row {
        names: &["kms.core.windows.net"],
        ports: &["TCP:1688"],
    },
];

/// Every preset, in the order `egress-agent presets` lists them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "aks-global",
        description: "required egress of AKS nodes in Azure (global), and the Azure platform addresses",
        params: &[Param::Location],
        regions: Cloud::Global,
        cloud: true,
        rows: AKS_GLOBAL,
    },
    Preset {
        name: "aks-china",
        description: "required egress of AKS nodes in Azure China 21Vianet, and the Azure platform addresses",
        params: &[Param::Location],
        regions: Cloud::China,
        cloud: true,
        rows: AKS_CHINA,
    },
    Preset {
        name: "aks-government",
        description: "required egress of AKS nodes in Azure Government, and the Azure platform addresses",
        params: &[Param::Location],
        regions: Cloud::Government,
        cloud: true,
        rows: AKS_GOVERNMENT,
    },
    Preset {
        name: "ubuntu-updates",
        description: "recommended: Ubuntu security patches and updates (HTTP)",
        params: &[],
        regions: Cloud::Global,
        cloud: false,
        rows: UBUNTU_UPDATES,
    },
    Preset {
        name: "gpu",
        description: "GPU node pools: NVIDIA driver installation",
        params: &[],
        regions: Cloud::Global,
        cloud: false,
        rows: GPU,
    },
    Preset {
        name: "azure-monitor",
        description: "Azure Monitor for containers",
        params: &[],
        regions: Cloud::Global,
        cloud: false,
        rows: AZURE_MONITOR,
    },
    Preset {
        name: "azure-policy",
        description: "Azure Policy add-on (preview)",
        params: &[Param::Location],
        regions: Cloud::Global,
        cloud: false,
        rows: AZURE_POLICY,
    },
    Preset {
        name: "windows",
        description: "Windows Server node pools, including KMS activation (TCP:1688)",
        params: &[],
        regions: Cloud::Global,
        cloud: false,
        rows: WINDOWS,
    },
];

/// Presets that were dropped, and why: a policy naming one is told rather than left to
/// guess from the list of valid names.
const RETIRED: &[(&str, &str)] = &[(
    "dev-spaces",
    "Azure Dev Spaces was retired on 31 October 2023 and its controllers are gone; remove the item (Bridge to Kubernetes, its successor, runs on developers' machines and needs no node egress)",
)];

/// The preset called `name`; the error lists the valid names.
pub fn find(name: &str) -> Result<&'static Preset, String> {
    if let Some((_, why)) = RETIRED.iter().find(|(retired, _)| *retired == name) {
        return Err(format!("preset `{name}` is no longer offered: {why}"));
    }
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        format!(
            "unknown preset `{name}`; expected one of: {}",
            names.join(", ")
        )
    })
}

/// How the cloud presets' tables write every AKS API server of the region.
const REGIONAL_API_SERVERS: &str = "*.hcp.<location>.";

/// The rules of preset `name`: exactly the rows of its table, with `params` filled in.
/// With `api_server`, the cluster's own API server name, a cloud preset allows that name in
/// place of its `*.hcp.<location>` row, which admits every API server in the region,
/// another customer's (an attacker's) too. The platform addresses that cloud presets bring
/// are separate: see [`platform`].
pub fn expand(
    name: &str,
    params: &Params,
    api_server: Option<&str>,
) -> Result<Vec<(Target, Ports)>, String> {
    let preset = find(name)?;
    let mut fills = Vec::new();
    for param in Param::ALL {
        let wanted = preset.params.contains(&param);
        match param.value(params) {
            None if wanted => {
                return Err(format!(
                    "`{name}` needs `{}`, {}",
                    param.key(),
                    param.hint()
                ));
            }
            Some(_) if !wanted => {
                return Err(format!(
                    "`{name}` has no parameter `{}`; {}",
                    param.key(),
                    takes(preset)
                ));
            }
            Some(value) => {
                param.check(value, preset)?;
                fills.push((param.placeholder(), value));
            }
            None => {}
        }
    }
    let mut rules = Vec::new();
    for row in preset.rows {
        let ports = parse_ports(row.ports)?;
        for name in row.names {
            if let Some(api_server) = api_server
                && name.starts_with(REGIONAL_API_SERVERS)
            {
                let location = params.location.as_deref().unwrap_or_default();
                check_api_server(api_server, preset.regions, location)?;
                rules.push((
                    Target::Name(NamePattern::Exact(api_server.to_string())),
                    ports.clone(),
                ));
                continue;
            }
            let name = fills
                .iter()
                .fold(name.to_string(), |name, (placeholder, value)| {
                    name.replace(placeholder, value)
                });
            rules.push((Target::Name(parse_fqdn(&name)?), ports.clone()));
        }
    }
    Ok(rules)
}

/// The row of a cloud preset that admits every API server of the region, as `expand` fills
/// it in: `*.hcp.eastus.azmk8s.io`. `None` for the other presets.
pub fn regional_api_servers(preset: &Preset, location: &str) -> Option<String> {
    preset
        .rows
        .iter()
        .flat_map(|row| row.names)
        .find(|name| name.starts_with(REGIONAL_API_SERVERS))
        .map(|name| name.replace(Param::Location.placeholder(), location))
}

/// Checks that `name` is the API server of a cluster in `location` of `cloud`:
/// `<cluster>.hcp.<location>.<zone>`, or `<cluster>.privatelink.<location>.<zone>` for a
/// private cluster (also with a custom private DNS zone, `<subzone>.privatelink.…`).
fn check_api_server(name: &str, cloud: Cloud, location: &str) -> Result<(), String> {
    let zone = cloud.aks_zone();
    let forms = ["hcp", "privatelink"].map(|kind| format!(".{kind}.{location}.{zone}"));
    let fits = forms.iter().any(|form| {
        name.strip_suffix(form.as_str())
            .is_some_and(|c| !c.is_empty())
    });
    if fits {
        return Ok(());
    }
    Err(format!(
        "API server `{name}` is not a cluster's API server in {location}: expected `<cluster>{}`, or for a private cluster `<cluster>{}`",
        forms[0], forms[1]
    ))
}

/// Which parameters a preset takes, for messages and `egress-agent presets`.
fn takes(preset: &Preset) -> String {
    match preset.params {
        [] => "it takes none".to_string(),
        params => {
            let keys: Vec<String> = params.iter().map(|p| format!("`{}`", p.key())).collect();
            format!("it takes {}", keys.join(" and "))
        }
    }
}

/// Azure's wire server: DNS, DHCP, the VM agent and load balancer health probes. A virtual
/// address of the host that only the platform can send from; Microsoft recommends allowing
/// it outbound in any firewall inside the VM, so every port is allowed.
const WIRESERVER: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
/// The instance metadata service, which also hands out managed identity tokens; HTTP only.
const IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The Azure platform addresses every node depends on, which the cloud presets add though
/// the article's tables leave them out.
pub fn platform() -> Vec<(Target, Ports)> {
    let host = |addr| Target::Cidr(IpNet::V4(Ipv4Net::from(addr)));
    let http = PortRange {
        proto: Proto::Tcp,
        first: 80,
        last: 80,
    };
    vec![
        (host(WIRESERVER), Ports::All),
        (host(IMDS), Ports::Some(vec![http])),
    ]
}

/// Checks the shape of an Azure region name: `eastus`, `westeurope`, `chinaeast2`,
/// `usgovvirginia`. Display names such as `East US` are refused (with a suggestion): they
/// cannot go into a DNS name.
fn check_location(location: &str) -> Result<(), String> {
    if location.is_empty() {
        return Err("`location` is empty; give the cluster's Azure region, e.g. `eastus`".into());
    }
    if region_shaped(location) {
        return Ok(());
    }
    let guess: String = location
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let suggestion = if region_shaped(&guess) {
        format!("; did you mean `{guess}`?")
    } else {
        String::new()
    };
    Err(format!(
        "location `{location}` is not an Azure region name (lowercase letters and digits, e.g. `eastus`, `westeurope`){suggestion}"
    ))
}

fn region_shaped(location: &str) -> bool {
    location.starts_with(|c: char| c.is_ascii_lowercase())
        && location
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests;
