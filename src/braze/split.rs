//! Pure: how a request Braze refuses as a whole (400, 413) is split down to the objects at
//! fault, in rounds.
//!
//! Each round sends every part still in question at once, and each refused part is halved for
//! the next round, so a request of n objects is settled in about log2(n) round trips however
//! many of its objects are at fault. Sending one half after the other instead (depth first)
//! costs a round trip per request sent: a batch of 75 with a few bad objects took dozens of
//! sequential round trips, which is what held a revoke's drain to its deadline (issue 19).

use std::ops::Range;

/// The parts of one request still to be sent. Promises: the parts of a round are disjoint
/// and within the request; a refused part of one object is never sent again (it is at
/// fault); every object ends in exactly one part that was answered, or refused alone.
#[derive(Debug)]
pub struct Bisection {
    round: Vec<Range<usize>>,
    next: Vec<Range<usize>>,
}

impl Bisection {
    pub fn new(objects: usize) -> Bisection {
        Bisection {
            round: (objects > 0).then_some(0..objects).into_iter().collect(),
            next: Vec::new(),
        }
    }

    /// The parts to send now, together; empty when everything is settled.
    pub fn round(&mut self) -> Vec<Range<usize>> {
        std::mem::take(&mut self.round)
    }

    /// Braze refused this part of the round as a whole: its halves go in the next round.
    /// Returns false for a part of one object, which is the one at fault.
    pub fn refused(&mut self, part: Range<usize>) -> bool {
        if part.len() <= 1 {
            return false;
        }
        let mid = part.start + part.len() / 2;
        self.next.push(part.start..mid);
        self.next.push(mid..part.end);
        true
    }

    /// Every answer of the round is in: the next round begins.
    pub fn end_round(&mut self) {
        self.round = std::mem::take(&mut self.next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a bisection against "a part is refused when it holds a bad object" and returns
    /// (rounds, requests, objects found at fault).
    fn run(objects: usize, bad: &[usize]) -> (usize, usize, Vec<usize>) {
        let mut b = Bisection::new(objects);
        let (mut rounds, mut requests, mut found) = (0, 0, Vec::new());
        loop {
            let round = b.round();
            if round.is_empty() {
                break;
            }
            rounds += 1;
            for part in round {
                requests += 1;
                if bad.iter().any(|i| part.contains(i)) && !b.refused(part.clone()) {
                    found.push(part.start);
                }
            }
            b.end_round();
        }
        found.sort();
        (rounds, requests, found)
    }

    #[test]
    fn every_bad_object_is_found_in_log2_rounds() {
        // A full batch with several bad objects: settled in ceil(log2 75) + 1 rounds, the
        // depth of the halving, not one round per request sent.
        let bad = [3, 17, 40, 41, 74];
        let (rounds, requests, found) = run(75, &bad);
        assert_eq!(found, bad.to_vec());
        assert!(rounds <= 8, "{rounds} rounds");
        assert!(
            requests > rounds * 2,
            "{requests} requests in {rounds} rounds"
        );
    }

    #[test]
    fn one_bad_object_of_eight_takes_seven_requests_in_four_rounds() {
        // 8 → 4+4 → the bad 4 → 2+2 → the bad 2 → 1+1.
        assert_eq!(run(8, &[5]), (4, 7, vec![5]));
    }

    #[test]
    fn nothing_bad_is_one_request_and_nothing_is_no_request() {
        assert_eq!(run(75, &[]), (1, 1, vec![]));
        assert_eq!(run(0, &[]), (0, 0, vec![]));
    }
}
