//! What the Braze tasks and the dead-letter producer report back to the poll loop, over one
//! channel, so nothing the pipeline owns is shared with them.

use crate::braze::ObjectOutcome;
use crate::dlq::DlqOutcome;

pub enum Ack {
    /// A request finished: one outcome per object, in the request's order.
    Braze {
        id: u64,
        outcomes: Vec<ObjectOutcome>,
    },
    DeadLetter(DlqOutcome),
}
