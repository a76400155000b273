//! `[[policy]]` validation: names, plugin files, sandbox settings and the plugin's own config.
//! Compiling the plugin and calling its `init` happen when the config is applied
//! ([`crate::runtime::Runtime::prepare`]), with errors reported at the `plugin` line.

use super::model::PolicyFile;
use super::validate::Ctx;
use crate::plugin::{FailMode, PolicySettings};
use crate::policy::chain::Matcher;
use crate::policy::glob::Glob;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default longest hold caused by a policy's `delay` verdicts.
pub const DEFAULT_POLICY_MAX_DELAY: Duration = Duration::from_secs(5);

/// One validated `[[policy]]`.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Name.
    pub name: Arc<str>,
    /// Line of its `name`.
    pub line: usize,
    /// Line of its `plugin` (where load errors are reported).
    pub plugin_line: usize,
    /// The `.wasm` file, resolved against the config file's directory.
    pub plugin: PathBuf,
    /// Which publishes it sees.
    pub matcher: Matcher,
    /// Sandbox and failure settings, with the plugin's config as JSON.
    pub settings: PolicySettings,
    /// Count "would" verdicts, forward everything.
    pub dry_run: bool,
    /// Longest hold its delay verdicts may cause.
    pub max_delay: Duration,
}

impl PolicyConfig {
    /// Whether two configs load the same plugin the same way (then the loaded version is kept
    /// across a reload, with its instances and counters).
    pub fn same_load(&self, other: &PolicyConfig) -> bool {
        let (a, b) = (&self.settings, &other.settings);
        self.plugin == other.plugin
            && a.config_json == b.config_json
            && a.fail == b.fail
            && a.time_budget == b.time_budget
            && a.memory_limit == b.memory_limit
            && a.max_errors == b.max_errors
            && a.error_window == b.error_window
    }
}

pub(super) fn build(
    files: &[PolicyFile],
    quota_names: &HashSet<String>,
    config_path: &Path,
    cx: &mut Ctx<'_>,
) -> Vec<PolicyConfig> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for f in files {
        let name = f.name.get_ref();
        if name.is_empty() {
            cx.at(&f.name, "policy name is empty");
        }
        if !names.insert(name.clone()) {
            cx.at(&f.name, format!("duplicate policy name '{name}'"));
        } else if quota_names.contains(name) {
            cx.at(
                &f.name,
                format!("policy '{name}' has the name of a quota: names label metrics, make them unique"),
            );
        }
        let plugin = base.join(f.plugin.get_ref());
        if !plugin.is_file() {
            cx.at(
                &f.plugin,
                format!(
                    "policy '{name}': plugin file {} not found (build the plugins with `make plugins`)",
                    plugin.display()
                ),
            );
        }
        let config_json = match &f.config {
            None => String::new(),
            Some(v) => match serde_json::to_string(v.get_ref()) {
                Ok(j) => j,
                Err(e) => {
                    cx.at(
                        v,
                        format!("policy '{name}': config cannot be passed as JSON: {e}"),
                    );
                    String::new()
                }
            },
        };
        let mut settings = PolicySettings::new(name.as_str(), config_json);
        if let Some(fail) = &f.fail {
            settings.fail = match fail.get_ref().as_str() {
                "open" => FailMode::Open,
                "closed" => FailMode::Closed,
                other => {
                    cx.at(
                        fail,
                        format!("policy '{name}': fail = '{other}' must be \"open\" or \"closed\""),
                    );
                    FailMode::Open
                }
            };
        }
        settings.time_budget = cx.duration(
            &f.time_budget,
            &format!("policy '{name}': time_budget"),
            settings.time_budget,
        );
        if let Some(tb) = &f.time_budget {
            if settings.time_budget.is_zero() || settings.time_budget > Duration::from_secs(1) {
                cx.at(
                    tb,
                    format!("policy '{name}': time_budget must be between 1ms and 1s"),
                );
            }
        }
        let mem = cx.size(
            &f.memory_limit,
            &format!("policy '{name}': memory_limit"),
            settings.memory_limit as u64,
        );
        settings.memory_limit = usize::try_from(mem).unwrap_or(usize::MAX);
        if let Some(m) = &f.memory_limit {
            if settings.memory_limit > crate::plugin::MAX_MEMORY || settings.memory_limit < 1 << 16
            {
                cx.at(
                    m,
                    format!(
                        "policy '{name}': memory_limit must be between 64KiB and {}MiB",
                        crate::plugin::MAX_MEMORY >> 20
                    ),
                );
            }
        }
        if let Some(n) = f.max_errors {
            settings.max_errors = n.max(1);
        }
        settings.error_window = cx.duration(
            &f.error_window,
            &format!("policy '{name}': error_window"),
            settings.error_window,
        );
        let max_delay = cx.duration(
            &f.max_delay,
            &format!("policy '{name}': max_delay"),
            DEFAULT_POLICY_MAX_DELAY,
        );
        let m = &f.matches;
        out.push(PolicyConfig {
            name: name.as_str().into(),
            line: cx.line_of(f.name.span().start),
            plugin_line: cx.line_of(f.plugin.span().start),
            plugin,
            matcher: Matcher {
                producer: m.producer.as_deref().map(Glob::new),
                vhost: m.vhost.as_deref().map(Glob::new),
                exchange: m.exchange.as_deref().map(Glob::new),
                routing_key: m.routing_key.as_deref().map(Glob::new),
            },
            settings,
            dry_run: f.dry_run,
            max_delay,
        });
    }
    out
}
