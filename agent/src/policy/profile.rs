//! The AI-mode profiles (`local_llm`, `batch_inference`, `image_generation`): how a matched
//! workload is protected, and from which risk level its neighbours have to yield. A workload
//! rule names a profile and may override any of its settings.

use serde::{Deserialize, Serialize};

use super::Matcher;
use crate::{config::Bytes, predict::Level};

/// A profile's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileName {
    /// Interactive inference: weights pinned, the cgroup protected, no swap, neighbours
    /// throttled as soon as the risk is elevated, idle runtime models unloaded when critical.
    LocalLlm,
    /// Throughput: a larger KV allowance in the protection; neighbours throttled.
    BatchInference,
    /// Diffusion pipelines: weights pinned, extra headroom for activation peaks (VAE
    /// decode), no KV cache.
    ImageGeneration,
}

/// Which cgroup v2 protection a workload's cgroup gets (v1 has only the soft limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protect {
    None,
    /// `memory.low`: best effort, reclaimed only when nothing else can be.
    Low,
    /// `memory.min`: never reclaimed (the OOM killer acts instead).
    Min,
}

/// What a profile does for a workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub name: ProfileName,
    /// Pin the model files it maps in RAM.
    pub pin_weights: bool,
    pub protect: Protect,
    /// The protected size: weights + `kv_allowance` × the KV cache at the context in effect,
    /// plus this share on top.
    pub protect_headroom: f64,
    pub kv_allowance: f64,
    /// The workload's `oom_score_adj` (None: left alone).
    pub oom_score_adj: Option<i32>,
    /// Swap limit of its cgroup (None: left alone).
    pub swap_max: Option<u64>,
    /// From this risk level of the workload on, neighbours yield.
    pub act_at: Level,
    pub throttle_neighbours: bool,
    /// At critical, ask the runtime (Ollama) to unload the models it is not using.
    pub unload_idle_models: bool,
}

impl ProfileName {
    /// The profile's defaults.
    pub fn defaults(self) -> Profile {
        let local = Profile {
            name: self,
            pin_weights: true,
            protect: Protect::Low,
            protect_headroom: 0.10,
            kv_allowance: 1.0,
            oom_score_adj: Some(-900),
            swap_max: Some(0),
            act_at: Level::Elevated,
            throttle_neighbours: true,
            unload_idle_models: true,
        };
        match self {
            ProfileName::LocalLlm => local,
            ProfileName::BatchInference => Profile {
                kv_allowance: 1.5,
                oom_score_adj: Some(-500),
                swap_max: None,
                unload_idle_models: false,
                ..local
            },
            ProfileName::ImageGeneration => Profile {
                protect_headroom: 0.25,
                kv_allowance: 0.0,
                oom_score_adj: Some(-700),
                swap_max: None,
                unload_idle_models: false,
                ..local
            },
        }
    }
}

/// `[[policy.workload]]`: a profile for the processes a matcher selects, with overrides.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRule {
    pub profile: ProfileName,
    #[serde(rename = "match")]
    pub matcher: Matcher,
    pub pin_weights: Option<bool>,
    pub protect: Option<Protect>,
    pub protect_headroom: Option<Fraction>,
    pub kv_allowance: Option<Fraction>,
    pub oom_score_adj: Option<OomScoreAdj>,
    /// Bytes, or `"max"`... a size: `swap_max = "0"` forbids swap.
    pub swap_max: Option<Bytes>,
    pub act_at: Option<Level>,
    pub throttle_neighbours: Option<bool>,
    pub unload_idle_models: Option<bool>,
}

impl WorkloadRule {
    /// The profile with this rule's overrides.
    pub fn profile(&self) -> Profile {
        let d = self.profile.defaults();
        Profile {
            name: self.profile,
            pin_weights: self.pin_weights.unwrap_or(d.pin_weights),
            protect: self.protect.unwrap_or(d.protect),
            protect_headroom: self.protect_headroom.map_or(d.protect_headroom, |f| f.0),
            kv_allowance: self.kv_allowance.map_or(d.kv_allowance, |f| f.0),
            oom_score_adj: self.oom_score_adj.map_or(d.oom_score_adj, |a| Some(a.0)),
            swap_max: self.swap_max.map_or(d.swap_max, |b| Some(b.0)),
            act_at: self.act_at.unwrap_or(d.act_at),
            throttle_neighbours: self.throttle_neighbours.unwrap_or(d.throttle_neighbours),
            unload_idle_models: self.unload_idle_models.unwrap_or(d.unload_idle_models),
        }
    }
}

/// A share between 0 and 4 (an allowance of four times the KV cache is already absurd).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Fraction(pub f64);

impl TryFrom<f64> for Fraction {
    type Error = String;
    fn try_from(value: f64) -> Result<Self, String> {
        if (0.0..=4.0).contains(&value) {
            Ok(Fraction(value))
        } else {
            Err(format!("{value} is not a share between 0 and 4"))
        }
    }
}

/// An `oom_score_adj`: -1000 (never killed) to 1000 (killed first).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "i64")]
pub struct OomScoreAdj(pub i32);

impl TryFrom<i64> for OomScoreAdj {
    type Error = String;
    fn try_from(value: i64) -> Result<Self, String> {
        if (-1000..=1000).contains(&value) {
            Ok(OomScoreAdj(value as i32))
        } else {
            Err(format!("oom_score_adj {value} is outside -1000..=1000"))
        }
    }
}
