//! Built-in presets: the egress an AKS node needs, from the tables of the Azure article
//! "Control egress traffic for cluster nodes in Azure Kubernetes Service (AKS)", as restated
//! in `shared/aks-egress-requirements.md` (checked against the German revision, the newest).
//!
//! A policy names presets instead of copying forty rows; `policy` turns them into rules.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

use crate::policy::{PortRange, Ports, Proto, Target, parse_fqdn, parse_ports};

/// A built-in preset: rows of one article table, plus parameters filled into them.
#[derive(Debug)]
pub struct Preset {
    pub name: &'static str,
    /// One line for `egress-agent presets`.
    pub description: &'static str,
    pub params: &'static [Param],
    /// One of the three clouds' required sets. A node runs in exactly one cloud, and these
    /// also bring the Azure platform addresses (see [`platform`]).
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
    /// The Dev Spaces controller's exact name, which no pattern can guess.
    Fqdn,
}

impl Param {
    const ALL: [Param; 2] = [Param::Location, Param::Fqdn];

    /// The key in a `presets` item (and the `presets show` option).
    pub fn key(self) -> &'static str {
        match self {
            Param::Location => "location",
            Param::Fqdn => "fqdn",
        }
    }

    /// What the rows contain where the value goes.
    fn placeholder(self) -> &'static str {
        match self {
            Param::Location => "<location>",
            Param::Fqdn => "azds-<guid>.<location>.azds.io",
        }
    }

    fn value(self, params: &Params) -> Option<&str> {
        match self {
            Param::Location => params.location.as_deref(),
            Param::Fqdn => params.fqdn.as_deref(),
        }
    }

    fn check(self, value: &str) -> Result<(), String> {
        match self {
            Param::Location => check_location(value),
            Param::Fqdn => check_dataplane_fqdn(value),
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Param::Location => "the cluster's Azure region, e.g. `eastus`",
            Param::Fqdn => {
                "the controller's `dataplaneFqdn` (in %USERPROFILE%\\.azds\\settings.json), `azds-<guid>.<location>.azds.io`"
            }
        }
    }
}

/// The parameters given to one preset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub location: Option<String>,
    pub fqdn: Option<String>,
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

/// "Optional groups": GPU nodes.
const GPU: &[Row] = &[Row {
    names: &[
        "nvidia.github.io",
        "us.download.nvidia.com",
        "apt.dockerproject.org",
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

/// "Optional groups": Azure Dev Spaces.
const DEV_SPACES: &[Row] = &[Row {
    names: &[
        "cloudflare.docker.com",
        "gcr.io",
        "storage.googleapis.com",
        "azds-<guid>.<location>.azds.io",
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
        cloud: true,
        rows: AKS_GLOBAL,
    },
    Preset {
        name: "aks-china",
        description: "required egress of AKS nodes in Azure China 21Vianet, and the Azure platform addresses",
        params: &[Param::Location],
        cloud: true,
        rows: AKS_CHINA,
    },
    Preset {
        name: "aks-government",
        description: "required egress of AKS nodes in Azure Government, and the Azure platform addresses",
        params: &[Param::Location],
        cloud: true,
        rows: AKS_GOVERNMENT,
    },
    Preset {
        name: "ubuntu-updates",
        description: "recommended: Ubuntu security patches and updates (HTTP)",
        params: &[],
        cloud: false,
        rows: UBUNTU_UPDATES,
    },
    Preset {
        name: "gpu",
        description: "GPU node pools: NVIDIA driver installation",
        params: &[],
        cloud: false,
        rows: GPU,
    },
    Preset {
        name: "azure-monitor",
        description: "Azure Monitor for containers",
        params: &[],
        cloud: false,
        rows: AZURE_MONITOR,
    },
    Preset {
        name: "dev-spaces",
        description: "Azure Dev Spaces, with the controller's azds-… name",
        params: &[Param::Fqdn],
        cloud: false,
        rows: DEV_SPACES,
    },
    Preset {
        name: "azure-policy",
        description: "Azure Policy add-on (preview)",
        params: &[Param::Location],
        cloud: false,
        rows: AZURE_POLICY,
    },
    Preset {
        name: "windows",
        description: "Windows Server node pools, including KMS activation (TCP:1688)",
        params: &[],
        cloud: false,
        rows: WINDOWS,
    },
];

/// The preset called `name`; the error lists the valid names.
pub fn find(name: &str) -> Result<&'static Preset, String> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        format!(
            "unknown preset `{name}`; expected one of: {}",
            names.join(", ")
        )
    })
}

/// The rules of preset `name`: exactly the rows of its table, with `params` filled in.
/// The platform addresses that cloud presets bring are separate: see [`platform`].
pub fn expand(name: &str, params: &Params) -> Result<Vec<(Target, Ports)>, String> {
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
                param.check(value)?;
                fills.push((param.placeholder(), value));
            }
            None => {}
        }
    }
    let mut rules = Vec::new();
    for row in preset.rows {
        let ports = parse_ports(row.ports)?;
        for name in row.names {
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

/// Checks that `fqdn` is a Dev Spaces controller name, `azds-<guid>.<location>.azds.io`.
fn check_dataplane_fqdn(fqdn: &str) -> Result<(), String> {
    let lower = fqdn.strip_suffix('.').unwrap_or(fqdn).to_ascii_lowercase();
    let shaped = lower
        .strip_suffix(".azds.io")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(host, location)| {
            host.strip_prefix("azds-").is_some_and(|id| {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }) && region_shaped(location)
        });
    if shaped {
        Ok(())
    } else {
        Err(format!(
            "`{fqdn}` is not a Dev Spaces controller name; expected {}",
            Param::Fqdn.hint()
        ))
    }
}

#[cfg(test)]
mod tests;
