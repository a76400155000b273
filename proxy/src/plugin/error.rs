//! Plugin errors: [`PluginError`] for loading, [`ErrorKind`] for failed evaluations.

use std::path::PathBuf;

/// Why a plugin could not be loaded. Each message names the policy and the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The engine could not be created.
    #[error("cannot create the Wasm engine: {0}")]
    Engine(String),
    /// The file could not be read.
    #[error("policy {policy}: cannot read plugin {}: {source}", path.display())]
    Read {
        /// Policy name.
        policy: String,
        /// Plugin file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a valid component, or it failed to compile.
    #[error("policy {policy}: {} is not a valid policy component: {reason}", path.display())]
    Compile {
        /// Policy name.
        policy: String,
        /// Plugin file.
        path: PathBuf,
        /// Compiler message.
        reason: String,
    },
    /// Built against a WIT package version this host does not implement.
    #[error(
        "policy {policy}: {} is built for {found}, but this sluice implements \
         sluice:policy@{expected}; rebuild it with sluice-policy-sdk {expected}",
        path.display()
    )]
    IncompatibleVersion {
        /// Policy name.
        policy: String,
        /// Plugin file.
        path: PathBuf,
        /// What the plugin exports or imports, e.g. `sluice:policy/policy@0.2.0`.
        found: String,
        /// The version this host implements.
        expected: &'static str,
    },
    /// It imports something sluice does not provide.
    #[error("policy {policy}: {} imports `{import}`, which sluice does not provide", path.display())]
    UnknownImport {
        /// Policy name.
        policy: String,
        /// Plugin file.
        path: PathBuf,
        /// The import.
        import: String,
    },
    /// Instantiation failed (e.g. the memory cap is below what the plugin needs to start).
    #[error("policy {policy}: cannot instantiate {}: {reason}", path.display())]
    Instantiate {
        /// Policy name.
        policy: String,
        /// Plugin file.
        path: PathBuf,
        /// The error.
        reason: String,
    },
    /// The plugin's `init` rejected its config.
    #[error("policy {policy}: {} rejected its config: {message}", path.display())]
    InitRejected {
        /// Policy name.
        policy: String,
        /// Plugin file.
        path: PathBuf,
        /// The plugin's own message.
        message: String,
    },
    /// The settings are unusable (e.g. a memory limit above the engine's maximum).
    #[error("policy {policy}: {reason}")]
    Settings {
        /// Policy name.
        policy: String,
        /// What is wrong.
        reason: String,
    },
}

/// Why an evaluation did not produce the plugin's own verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The plugin trapped (panic, `unreachable`, out-of-bounds access, a denied WASI call that
    /// traps, ...).
    Trap,
    /// It ran past its time budget and was interrupted.
    Timeout,
    /// It tried to grow its memory past the cap.
    Memory,
    /// A fresh instance could not be created (or its `init` failed).
    Instantiate,
    /// The policy is disabled after too many errors; the plugin was not run.
    Disabled,
}

impl ErrorKind {
    /// Every kind, in metric order.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Trap,
        ErrorKind::Timeout,
        ErrorKind::Memory,
        ErrorKind::Instantiate,
        ErrorKind::Disabled,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Trap => "trap",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Memory => "memory",
            ErrorKind::Instantiate => "instantiate",
            ErrorKind::Disabled => "disabled",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
