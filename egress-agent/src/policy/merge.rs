//! Presets and repeated targets merged into one rule per target.

use std::collections::HashMap;

use super::presets::{self, Params};
use super::raw::RawPreset;
use super::types::{Notice, Origin, Ports, Rule, Target};
use super::validate::{ApiServerName, ApiServerSource, Problems, invalid};

/// Adds the rows of the `presets` to `rules`, and the platform addresses with a cloud preset.
pub(super) fn add_presets(
    presets: Option<Vec<RawPreset>>,
    rules: &mut RuleSet,
    api_server: Option<ApiServerName>,
    notices: &mut Vec<Notice>,
    problems: &mut Problems,
    source: &str,
) {
    let Some(presets) = presets else {
        return;
    };
    if presets.is_empty() {
        problems.keep::<()>(Err(invalid(
            source,
            "presets",
            "is empty; omit it, or name at least one preset",
        )));
    }
    // The items added so far, with their index.
    let mut seen: Vec<(usize, &'static presets::Preset)> = Vec::new();
    for (i, raw) in presets.into_iter().enumerate() {
        if raw.reported {
            continue;
        }
        let at = format!("presets[{i}] ({})", raw.name);
        let added = add_preset(raw, &seen, rules, api_server.as_ref(), notices, &at)
            .map_err(|p| invalid(source, &at, p));
        if let Some(preset) = problems.keep(added) {
            seen.push((i, preset));
        }
    }
}

/// Adds the rows of one preset item; returns the preset, to refuse repeating it.
fn add_preset(
    raw: RawPreset,
    seen: &[(usize, &'static presets::Preset)],
    rules: &mut RuleSet,
    api_server: Option<&ApiServerName>,
    notices: &mut Vec<Notice>,
    at: &str,
) -> Result<&'static presets::Preset, String> {
    let preset = presets::find(&raw.name)?;
    if let Some((j, _)) = seen.iter().find(|(_, p)| p.name == preset.name) {
        return Err(format!("repeats presets[{j}]"));
    }
    if let Some((_, cloud)) = seen.iter().find(|(_, p)| p.cloud && preset.cloud) {
        return Err(format!(
            "`{}` is listed too, and a node runs in one cloud; keep one of aks-global, aks-china and aks-government",
            cloud.name
        ));
    }
    let params = Params {
        location: raw.location,
    };
    for (target, ports) in expand(preset, &params, api_server, at, notices)? {
        rules.add(target, ports, Origin::Preset { name: preset.name });
    }
    if preset.cloud {
        for (target, ports) in presets::platform() {
            rules.add(target, ports, Origin::Platform);
        }
    }
    Ok(preset)
}

/// Expands one preset item. A cloud preset allows the cluster's own API server in place of
/// every one in the region when its name is known, and says which it did: a note when it
/// narrowed, a warning when it could not. A name from the policy that does not fit the
/// preset's region is an error; one from the kubeconfig only a warning, as the policy is
/// not wrong.
fn expand(
    preset: &presets::Preset,
    params: &Params,
    api_server: Option<&ApiServerName>,
    at: &str,
    notices: &mut Vec<Notice>,
) -> Result<Vec<(Target, Ports)>, String> {
    let location = params.location.as_deref().unwrap_or_default();
    let Some(regional) = presets::regional_api_servers(preset, location) else {
        return presets::expand(preset.name, params, None);
    };
    let mut notice = |warning, text| {
        notices.push(Notice {
            warning,
            at: at.to_string(),
            text,
        })
    };
    let unnarrowed = format!(
        "`{regional}` admits every AKS API server in {location}, other customers' too; give `api_server` the cluster's API server name (`az aks show -g RG -n NAME --query fqdn`), or run where the kubelet's kubeconfig names it"
    );
    let Some(name) = api_server else {
        let rules = presets::expand(preset.name, params, None)?;
        notice(true, unnarrowed);
        return Ok(rules);
    };
    let from = match name.from {
        ApiServerSource::Policy => "`api_server`".to_string(),
        ApiServerSource::Kubeconfig(file) => format!("the kubelet's kubeconfig {file}"),
    };
    match presets::expand(preset.name, params, Some(name.name)) {
        Ok(rules) => {
            notice(
                false,
                format!(
                    "allows the cluster's own API server `{}` (from {from}) in place of `{regional}`",
                    name.name
                ),
            );
            Ok(rules)
        }
        Err(problem) if matches!(name.from, ApiServerSource::Kubeconfig(_)) => {
            let rules = presets::expand(preset.name, params, None)?;
            notice(true, format!("{problem} (from {from}); {unnarrowed}"));
            Ok(rules)
        }
        Err(problem) => Err(problem),
    }
}

/// Rules by target, in the order targets first appear; a repeated target merges into the
/// first rule.
#[derive(Default)]
pub(super) struct RuleSet {
    pub(super) rules: Vec<Rule>,
    index: HashMap<Target, usize>,
}

impl RuleSet {
    pub(super) fn add(&mut self, target: Target, ports: Ports, origin: Origin) {
        match self.index.get(&target) {
            Some(&i) => {
                let rule = &mut self.rules[i];
                rule.ports = rule.ports.union(&ports);
                rule.origins.push(origin);
            }
            None => {
                self.index.insert(target.clone(), self.rules.len());
                self.rules.push(Rule {
                    target,
                    ports,
                    origins: vec![origin],
                });
            }
        }
    }

    /// Where the rule for `target` comes from so far; empty if there is none.
    pub(super) fn origins(&self, target: &Target) -> &[Origin] {
        self.index
            .get(target)
            .map_or(&[], |&i| &self.rules[i].origins)
    }
}
