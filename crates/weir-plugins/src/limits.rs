//! Config pieces limit-conn and limit-req share, as APISIX's schemas share them.

use serde::{Deserialize, Serialize};

use crate::JsonSchema;

/// How `key` names what requests are counted by: one variable, or a template of several.
#[derive(Deserialize, Serialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub(crate) enum KeyType {
    #[default]
    Var,
    VarCombination,
}

impl KeyType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyType::Var => "var",
            KeyType::VarCombination => "var_combination",
        }
    }
}

/// Where counts are kept: in this process only.
#[derive(Deserialize, Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LocalPolicy {
    #[default]
    Local,
}

/// APISIX's status for a refused request.
pub(crate) fn code_503() -> u16 {
    503
}
