//! The `Ready` condition, compatible with kstatus: `observedGeneration` on the condition, and
//! `lastTransitionTime` kept unless the status really changes.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::api::CONDITION_READY;

/// Returns `previous` with its Ready condition replaced. Other condition types are kept as they are.
pub fn set_ready(
    previous: Option<&[Condition]>,
    ready: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let status = if ready { "True" } else { "False" };
    let mut conditions: Vec<Condition> = previous.unwrap_or_default().to_vec();
    let old = conditions
        .iter()
        .position(|c| c.type_ == CONDITION_READY)
        .map(|i| conditions.remove(i));
    let last_transition_time = match old {
        Some(old) if old.status == status => old.last_transition_time,
        _ => Time(now),
    };
    conditions.insert(
        0,
        Condition {
            type_: CONDITION_READY.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation: generation,
            last_transition_time,
        },
    );
    conditions
}

/// The Ready condition in a list, if any.
pub fn ready_condition(conditions: Option<&[Condition]>) -> Option<&Condition> {
    conditions?.iter().find(|c| c.type_ == CONDITION_READY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn transition_time_is_kept_while_the_status_stays() {
        let first = set_ready(None, true, "Issued", "a", Some(1), ts(10));
        let second = set_ready(Some(&first), true, "Rotated", "b", Some(2), ts(20));
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].last_transition_time, Time(ts(10)));
        assert_eq!(second[0].reason, "Rotated");
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn transition_time_moves_when_the_status_changes() {
        let first = set_ready(None, true, "Issued", "a", Some(1), ts(10));
        let second = set_ready(Some(&first), false, "Revoked", "b", Some(1), ts(20));
        assert_eq!(second[0].status, "False");
        assert_eq!(second[0].last_transition_time, Time(ts(20)));
    }

    #[test]
    fn other_conditions_are_kept() {
        let other = Condition {
            type_: "Other".into(),
            status: "True".into(),
            reason: "X".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(ts(1)),
        };
        let set = set_ready(
            Some(std::slice::from_ref(&other)),
            false,
            "Denied",
            "m",
            None,
            ts(5),
        );
        assert_eq!(set.len(), 2);
        assert_eq!(set[1], other);
    }
}
