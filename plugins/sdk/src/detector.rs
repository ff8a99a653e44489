//! The author-facing trait.

use crate::abi::{EvalRequest, InputSpec, Manifest};
use crate::context::Context;
use crate::params::Params;

/// A detector. One instance lives in the plugin library between passes; its durable
/// state is whatever it writes through [`Context::state_put`], which the host commits
/// together with the pass's findings and hands back to [`Detector::init`] after a restart.
pub trait Detector: Sized + Send + 'static {
    fn manifest() -> Manifest;

    /// Builds the detector from resolved parameters and its persisted state.
    fn init(params: &Params, state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String>;

    /// How the detector wants its inputs handed over (filters the host applies, tables a
    /// backfill can skip), asked right after `init`. The default: every row of every
    /// input.
    fn inputs(&self) -> Vec<InputSpec> {
        Vec::new()
    }

    /// Evaluates the rows that are new since the last pass. Findings go to
    /// [`Context::emit`]; look-ups of stored rows go through the context.
    fn evaluate(&mut self, batch: &EvalRequest, ctx: &mut Context<'_>) -> Result<(), String>;
}
