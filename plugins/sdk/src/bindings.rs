//! Generated bindings for the `sluice:policy` world (from the repository's `wit/`).
//! Plugin authors do not use these directly: see [`crate::Policy`].
#![allow(missing_docs)]

wit_bindgen::generate!({
    path: "../../wit",
    world: "plugin",
    pub_export_macro: true,
    export_macro_name: "export",
    default_bindings_module: "sluice_policy_sdk::bindings",
});
