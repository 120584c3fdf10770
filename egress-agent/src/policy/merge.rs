//! Presets and repeated targets merged into one rule per target.

use std::collections::HashMap;

use super::PolicyError;
use super::raw::RawPreset;
use super::types::{Origin, Ports, Rule, Target};
use super::validate::invalid;
use crate::presets::{self, Params};

/// Adds the rows of the `presets` to `rules`, and the platform addresses with a cloud preset.
pub(super) fn add_presets(
    presets: Option<Vec<RawPreset>>,
    rules: &mut RuleSet,
    source: &str,
) -> Result<(), PolicyError> {
    let Some(presets) = presets else {
        return Ok(());
    };
    if presets.is_empty() {
        return Err(invalid(
            source,
            "presets",
            "is empty; omit it, or name at least one preset",
        ));
    }
    let mut seen: Vec<&'static presets::Preset> = Vec::new();
    for (i, raw) in presets.into_iter().enumerate() {
        let at = format!("presets[{i}] ({})", raw.name);
        let preset = presets::find(&raw.name).map_err(|p| invalid(source, &at, p))?;
        if let Some(j) = seen.iter().position(|p| p.name == preset.name) {
            return Err(invalid(source, at, format!("repeats presets[{j}]")));
        }
        if let Some(cloud) = seen.iter().find(|p| p.cloud && preset.cloud) {
            return Err(invalid(
                source,
                at,
                format!(
                    "`{}` is listed too, and a node runs in one cloud; keep one of aks-global, aks-china and aks-government",
                    cloud.name
                ),
            ));
        }
        let params = Params {
            location: raw.location,
            fqdn: raw.fqdn,
        };
        let expanded =
            presets::expand(preset.name, &params).map_err(|p| invalid(source, &at, p))?;
        for (target, ports) in expanded {
            rules.add(target, ports, Origin::Preset { name: preset.name });
        }
        if preset.cloud {
            for (target, ports) in presets::platform() {
                rules.add(target, ports, Origin::Platform);
            }
        }
        seen.push(preset);
    }
    Ok(())
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
