//! Detecting a Slurm allocation from the environment Slurm gives a batch script or a job step.
//!
//! Every node of a job reads the same variables, so each can work out the whole job's layout (the hosts,
//! which of them is the rendezvous master, the master's port) without talking to the others first.
//!
//! Slurm writes host and task lists in a compressed syntax: [`expand_hostlist`] reads
//! `SLURM_JOB_NODELIST` (`n[01-04,07],gpu-a100-3`) and [`expand_tasks_per_node`] reads
//! `SLURM_TASKS_PER_NODE` / `SLURM_JOB_CPUS_PER_NODE` (`2(x3),1`).

use std::fmt::Display;

use anyhow::{anyhow, bail, Context};

/// The most hosts (or per-node counts) one list may expand to. Real clusters stay far below it; a typo such
/// as `n[0-9999999999]` then fails with a message instead of exhausting memory.
const MAX_EXPANDED_ENTRIES: u64 = 1_000_000;

/// Expands a Slurm hostlist (`SLURM_JOB_NODELIST` syntax) into host names, in Slurm's order.
///
/// - Items are separated by commas outside brackets: `n[01-04,07],gpu-a100-3`.
/// - A bracket group holds comma-separated numbers and `low-high` ranges; the number width of a range (and
///   so its zero padding) is that of its low bound as written: `n[08-11]` is `n08 n09 n10 n11`.
/// - An item may hold several bracket groups; they expand as a cartesian product with the first group
///   varying slowest: `rack[1-2]-n[1-2]` is `rack1-n1 rack1-n2 rack2-n1 rack2-n2`.
/// - Whitespace around items is ignored.
///
/// Errors name the whole list and the offending item: unbalanced or nested brackets, empty items or
/// brackets, non-numeric or backwards ranges, whitespace inside a host name, and lists that would expand
/// to more than 1,000,000 hosts.
pub fn expand_hostlist(list: &str) -> anyhow::Result<Vec<String>> {
    if list.trim().is_empty() {
        bail!("hostlist {list:?} is empty");
    }
    // Parse every item before expanding any, so an oversized list is refused before memory is spent on it.
    let mut patterns = Vec::new();
    let mut host_count: u64 = 0;
    for raw_item in split_outside_brackets(list) {
        let item = raw_item.trim();
        let pattern = parse_hostlist_item(list, item)?;
        host_count = host_count
            .checked_add(pattern_host_count(&pattern))
            .filter(|&count| count <= MAX_EXPANDED_ENTRIES)
            .ok_or_else(|| {
                hostlist_error(list, item, format!("expands past the limit of {MAX_EXPANDED_ENTRIES} hosts"))
            })?;
        patterns.push(pattern);
    }
    Ok(patterns.iter().flat_map(|pattern| expand_pattern(pattern)).collect())
}

/// Expands Slurm's per-node count syntax (`SLURM_TASKS_PER_NODE`, `SLURM_JOB_CPUS_PER_NODE`): comma-separated
/// counts, each optionally repeated as `count(xTIMES)`, so `2(x3),1` is `[2, 2, 2, 1]`.
///
/// Errors name the whole value and the offending item: empty items, non-numeric counts or repetitions,
/// a repetition of zero, a malformed `(x…)` suffix, and values expanding to more than 1,000,000 entries.
pub fn expand_tasks_per_node(value: &str) -> anyhow::Result<Vec<usize>> {
    let list_error = |item: &str, problem: &str| anyhow!("per-node count list {value:?}: {problem} in {item:?}");
    if value.trim().is_empty() {
        bail!("per-node count list {value:?} is empty");
    }
    let mut counts = Vec::new();
    for raw_item in value.split(',') {
        let item = raw_item.trim();
        if item.is_empty() {
            return Err(list_error(item, "empty item"));
        }
        let (count_text, repeat) = match item.strip_suffix(')') {
            Some(head) => {
                let (count_text, repeat_text) =
                    head.split_once("(x").ok_or_else(|| list_error(item, "expected COUNT(xTIMES)"))?;
                let repeat = parse_digits(repeat_text)
                    .ok_or_else(|| list_error(item, "the repetition is not a non-negative integer"))?;
                (count_text, repeat)
            }
            None => (item, 1),
        };
        if repeat == 0 {
            return Err(list_error(item, "a repetition of zero"));
        }
        let count = parse_digits(count_text)
            .and_then(|count| usize::try_from(count).ok())
            .ok_or_else(|| list_error(item, "the count is not a non-negative integer"))?;
        let new_len = u64::try_from(counts.len())
            .ok()
            .and_then(|len| len.checked_add(repeat))
            .filter(|&len| len <= MAX_EXPANDED_ENTRIES)
            .and_then(|len| usize::try_from(len).ok())
            .ok_or_else(|| list_error(item, &format!("expands past the limit of {MAX_EXPANDED_ENTRIES} entries")))?;
        counts.resize(new_len, count);
    }
    Ok(counts)
}

/// The Slurm job this process runs in, as its environment describes it.
///
/// In the batch script itself (outside any `srun` step), and in an `salloc` shell, Slurm sets no per-task
/// variables, so `node_id`, `procid`, `localid` and `ntasks` are `None` there instead of a guessed 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmAllocation {
    /// `SLURM_JOB_ID`: for an array task, the task's own id (unique per task), not the array's.
    pub job_id: String,
    /// `SLURM_ARRAY_JOB_ID`: the id shared by all tasks of a job array.
    pub array_job_id: Option<String>,
    /// `SLURM_ARRAY_TASK_ID`: this task's index within its array.
    pub array_task_id: Option<usize>,
    /// `SLURM_NODEID`: this node's index in the allocation; `None` outside a job step.
    pub node_id: Option<usize>,
    /// `SLURM_JOB_NUM_NODES` (else `SLURM_NNODES`, else the length of `nodes`).
    pub nnodes: usize,
    /// `SLURM_PROCID`: this task's global rank; `None` outside a job step.
    pub procid: Option<usize>,
    /// `SLURM_LOCALID`: this task's rank on its node; `None` outside a job step.
    pub localid: Option<usize>,
    /// `SLURM_NTASKS`: `None` when the job was not given a task count.
    pub ntasks: Option<usize>,
    /// Expanded `SLURM_TASKS_PER_NODE`, one entry per node; empty when the variable is not set.
    pub tasks_per_node: Vec<usize>,
    /// Expanded `SLURM_JOB_NODELIST` (else `SLURM_NODELIST`); never empty.
    pub nodes: Vec<String>,
    /// `SLURM_GPUS_ON_NODE`, else the number of entries of a non-empty `CUDA_VISIBLE_DEVICES`.
    pub gpus_on_node: Option<usize>,
    /// `SLURM_RESTART_COUNT`: how often the job was requeued; 0 when not set.
    pub restart_count: usize,
}

impl SlurmAllocation {
    /// The allocation described by this process's environment, or `None` outside a Slurm job.
    pub fn from_env() -> anyhow::Result<Option<SlurmAllocation>> {
        Self::from_lookup(|name| match std::env::var(name) {
            Ok(value) => Some(value),
            Err(std::env::VarError::NotPresent) => None,
            // Passed on (lossily) rather than dropped, so the parse error shows the bad value.
            Err(std::env::VarError::NotUnicode(raw)) => Some(raw.to_string_lossy().into_owned()),
        })
    }

    /// The allocation described by the variables `get` returns; `Ok(None)` when `SLURM_JOB_ID` is unset.
    ///
    /// An empty variable counts as unset (`SLURM_JOB_ID= mgrun …` opts a command out of detection). Errors
    /// name the variable and its value.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<SlurmAllocation>> {
        let get = |name: &str| get(name).filter(|value| !value.trim().is_empty());
        let Some(job_id) = get("SLURM_JOB_ID") else {
            return Ok(None);
        };
        let job_id = parse_job_id("SLURM_JOB_ID", &job_id)?;

        let array_job_id = get("SLURM_ARRAY_JOB_ID").map(|value| parse_job_id("SLURM_ARRAY_JOB_ID", &value));
        let array_task_id = optional_count(&get, "SLURM_ARRAY_TASK_ID")?;
        let array_job_id = match (array_job_id.transpose()?, array_task_id) {
            (Some(array_job_id), None) => {
                bail!("SLURM_ARRAY_JOB_ID={array_job_id:?} is set but SLURM_ARRAY_TASK_ID is not")
            }
            (array_job_id, _) => array_job_id,
        };

        let (nodelist_name, nodelist) = ["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
            .into_iter()
            .find_map(|name| get(name).map(|value| (name, value)))
            .with_context(|| {
                format!("SLURM_JOB_ID={job_id:?} is set but neither SLURM_JOB_NODELIST nor SLURM_NODELIST is")
            })?;
        let nodes = expand_hostlist(&nodelist).with_context(|| format!("{nodelist_name}={nodelist:?}"))?;

        // SLURM_JOB_NUM_NODES first: inside a step SLURM_NNODES counts the step's nodes, not the job's.
        let nnodes = match optional_count(&get, "SLURM_JOB_NUM_NODES")? {
            Some(nnodes) => nnodes,
            None => optional_count(&get, "SLURM_NNODES")?.unwrap_or(nodes.len()),
        };

        let tasks_per_node = match get("SLURM_TASKS_PER_NODE") {
            Some(value) => expand_tasks_per_node(&value).with_context(|| format!("SLURM_TASKS_PER_NODE={value:?}"))?,
            None => Vec::new(),
        };

        let gpus_on_node = match optional_count(&get, "SLURM_GPUS_ON_NODE")? {
            Some(gpus) => Some(gpus),
            None => get("CUDA_VISIBLE_DEVICES").map(|devices| count_list_entries(&devices)).filter(|&n| n > 0),
        };

        Ok(Some(SlurmAllocation {
            job_id,
            array_job_id,
            array_task_id,
            node_id: optional_count(&get, "SLURM_NODEID")?,
            nnodes,
            procid: optional_count(&get, "SLURM_PROCID")?,
            localid: optional_count(&get, "SLURM_LOCALID")?,
            ntasks: optional_count(&get, "SLURM_NTASKS")?,
            tasks_per_node,
            nodes,
            gpus_on_node,
            restart_count: optional_count(&get, "SLURM_RESTART_COUNT")?.unwrap_or(0),
        }))
    }

    /// The rendezvous master's host: the first host of the nodelist, which every node expands identically.
    pub fn master_addr(&self) -> &str {
        // `nodes` is never empty when built by `from_lookup`; "" only for a hand-built value.
        self.nodes.first().map_or("", String::as_str)
    }

    /// The rendezvous port: 15000 plus the last four digits of the job id (as PyTorch Lightning does).
    ///
    /// Every node derives it from the same variable, so no node has to publish a port to the others before
    /// the rendezvous exists. Tasks of one job array can share a node at the same time: their
    /// `SLURM_JOB_ID`s differ (one per task) while `SLURM_ARRAY_JOB_ID` is shared, hence the former. The range
    /// 15000-24999 lies below Linux's ephemeral ports (32768 and up), so outgoing connections don't take it.
    /// Two jobs whose ids end in the same four digits would collide on a shared master node.
    pub fn master_port(&self) -> u16 {
        let digits: Vec<u16> =
            self.job_id.chars().filter_map(|c| c.to_digit(10)).filter_map(|d| u16::try_from(d).ok()).collect();
        let last_four = &digits[digits.len().saturating_sub(4)..];
        15000 + last_four.iter().fold(0, |port_offset, &digit| port_offset * 10 + digit)
    }

    /// The job id `scontrol requeue` takes: `ARRAYJOB_TASK` for an array task, else the job id.
    pub fn requeue_target(&self) -> String {
        match (&self.array_job_id, self.array_task_id) {
            (Some(array_job_id), Some(array_task_id)) => format!("{array_job_id}_{array_task_id}"),
            _ => self.job_id.clone(),
        }
    }

    /// Whether Slurm starts one task per node: `ntasks == nnodes`, or every node's task count is 1.
    pub fn is_one_task_per_node(&self) -> bool {
        self.ntasks == Some(self.nnodes)
            || (!self.tasks_per_node.is_empty() && self.tasks_per_node.iter().all(|&tasks| tasks == 1))
    }
}

/// A Slurm job id as given in `name`: decimal digits only, which [`SlurmAllocation::master_port`] relies on.
fn parse_job_id(name: &str, value: &str) -> anyhow::Result<String> {
    let job_id = value.trim();
    if !job_id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("{name}={value:?} is not a numeric job id");
    }
    Ok(job_id.to_string())
}

/// The non-negative integer in variable `name`, or `None` when it is unset.
fn optional_count(get: &impl Fn(&str) -> Option<String>, name: &str) -> anyhow::Result<Option<usize>> {
    get(name)
        .map(|value| value.trim().parse().with_context(|| format!("{name}={value:?} is not a non-negative integer")))
        .transpose()
}

/// The number of non-empty comma-separated entries (`0,1,3` is 3).
fn count_list_entries(list: &str) -> usize {
    list.split(',').filter(|entry| !entry.trim().is_empty()).count()
}

/// `text` as a number when it is one or more ASCII digits (so no sign, no spaces) that fit a u64.
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// One part of a hostlist item: literal text, or a bracket group of numbers.
#[derive(Debug)]
enum Segment<'a> {
    Literal(&'a str),
    Numbers(Vec<NumberRange>),
}

/// `low..=high`, each number written with at least `width` digits.
#[derive(Debug)]
struct NumberRange {
    low: u64,
    high: u64,
    width: usize,
}

/// An error about `part` of hostlist `list`.
fn hostlist_error(list: &str, part: &str, problem: impl Display) -> anyhow::Error {
    anyhow!("hostlist {list:?}: {problem} in {part:?}")
}

/// Splits at commas outside brackets. Bracket errors are left to the item parser, which names the item.
fn split_outside_brackets(list: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut item_start = 0;
    for (index, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&list[item_start..index]);
                item_start = index + 1;
            }
            _ => {}
        }
    }
    items.push(&list[item_start..]);
    items
}

/// Parses one trimmed item (`rack[1-2]-n[01-04,07]`) of hostlist `list` into literals and bracket groups.
fn parse_hostlist_item<'a>(list: &str, item: &'a str) -> anyhow::Result<Vec<Segment<'a>>> {
    if item.is_empty() {
        return Err(hostlist_error(list, item, "empty item"));
    }
    if item.chars().any(char::is_whitespace) {
        return Err(hostlist_error(list, item, "whitespace inside a host name"));
    }
    let mut segments = Vec::new();
    let mut rest = item;
    while let Some(bracket) = rest.find(['[', ']']) {
        if rest[bracket..].starts_with(']') {
            return Err(hostlist_error(list, item, "']' without a matching '['"));
        }
        if bracket > 0 {
            segments.push(Segment::Literal(&rest[..bracket]));
        }
        let after_open = &rest[bracket + 1..];
        let close = after_open.find(']').ok_or_else(|| hostlist_error(list, item, "'[' without a matching ']'"))?;
        let inside = &after_open[..close];
        if inside.contains('[') {
            return Err(hostlist_error(list, item, "nested brackets"));
        }
        segments.push(Segment::Numbers(parse_bracket_group(list, item, inside)?));
        rest = &after_open[close + 1..];
    }
    if !rest.is_empty() {
        segments.push(Segment::Literal(rest));
    }
    Ok(segments)
}

/// Parses the inside of one bracket group (`01-04,07`) of `item`.
fn parse_bracket_group(list: &str, item: &str, inside: &str) -> anyhow::Result<Vec<NumberRange>> {
    if inside.is_empty() {
        return Err(hostlist_error(list, item, "empty brackets"));
    }
    let parse_bound = |bound: &str, range: &str| {
        parse_digits(bound).ok_or_else(|| {
            hostlist_error(
                list,
                item,
                format!("range {range:?} has a bound {bound:?} that is not a 64-bit decimal number"),
            )
        })
    };
    let mut ranges = Vec::new();
    for range in inside.split(',') {
        if range.is_empty() {
            return Err(hostlist_error(list, item, format!("an empty range in [{inside}]")));
        }
        let (low_text, high_text) = range.split_once('-').unwrap_or((range, range));
        let low = parse_bound(low_text, range)?;
        let high = parse_bound(high_text, range)?;
        if low > high {
            return Err(hostlist_error(list, item, format!("range {range:?} has its low bound above its high bound")));
        }
        ranges.push(NumberRange { low, high, width: low_text.len() });
    }
    Ok(ranges)
}

/// How many hosts `pattern` expands to, saturating (well past the limit) instead of overflowing.
fn pattern_host_count(pattern: &[Segment]) -> u64 {
    pattern
        .iter()
        .map(|segment| match segment {
            Segment::Literal(_) => 1,
            Segment::Numbers(ranges) => {
                ranges.iter().fold(0u64, |sum, range| sum.saturating_add(range.high - range.low).saturating_add(1))
            }
        })
        .fold(1u64, u64::saturating_mul)
}

/// The hosts `pattern` stands for; the first bracket group varies slowest, as in Slurm.
fn expand_pattern(pattern: &[Segment]) -> Vec<String> {
    let mut hosts = vec![String::new()];
    for segment in pattern {
        match segment {
            Segment::Literal(text) => hosts.iter_mut().for_each(|host| host.push_str(text)),
            Segment::Numbers(ranges) => {
                let mut extended = Vec::new();
                for prefix in &hosts {
                    for range in ranges {
                        for number in range.low..=range.high {
                            extended.push(format!("{prefix}{number:0width$}", width = range.width));
                        }
                    }
                }
                hosts = extended;
            }
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn hosts(list: &str) -> Vec<String> {
        expand_hostlist(list).unwrap_or_else(|error| panic!("{list:?} should expand: {error:#}"))
    }

    /// The error message for a list that must be refused.
    fn hostlist_error_message(list: &str) -> String {
        match expand_hostlist(list) {
            Ok(hosts) => panic!("{list:?} should be refused, expanded to {} hosts", hosts.len()),
            Err(error) => format!("{error:#}"),
        }
    }

    #[test]
    fn plain_names_with_dashes_and_dots_pass_through() {
        assert_eq!(hosts("gpu-a100-3"), ["gpu-a100-3"]);
        assert_eq!(hosts("node1.cluster.local,node2.cluster.local"), ["node1.cluster.local", "node2.cluster.local"]);
    }

    #[test]
    fn ranges_keep_the_zero_padding_of_their_low_bound() {
        assert_eq!(hosts("n[08-11]"), ["n08", "n09", "n10", "n11"]);
        assert_eq!(hosts("n[8-11]"), ["n8", "n9", "n10", "n11"]);
        assert_eq!(hosts("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(hosts("n[98-0101]"), ["n98", "n99", "n100", "n101"]);
    }

    #[test]
    fn brackets_mix_single_numbers_and_ranges() {
        assert_eq!(hosts("n[5]"), ["n5"]);
        assert_eq!(hosts("n[007]"), ["n007"]);
        assert_eq!(hosts("n[01-03,07,10-11]"), ["n01", "n02", "n03", "n07", "n10", "n11"]);
        assert_eq!(hosts("[1-2]x"), ["1x", "2x"]);
    }

    #[test]
    fn commas_inside_brackets_do_not_split_items() {
        assert_eq!(
            hosts("n[01-04,07],gpu-a100-3,rack[1-2]-n[1-3]"),
            [
                "n01",
                "n02",
                "n03",
                "n04",
                "n07",
                "gpu-a100-3",
                "rack1-n1",
                "rack1-n2",
                "rack1-n3",
                "rack2-n1",
                "rack2-n2",
                "rack2-n3"
            ]
        );
    }

    #[test]
    fn several_bracket_groups_expand_with_the_first_varying_slowest() {
        assert_eq!(hosts("rack[1-2]-n[1-2]"), ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]);
        assert_eq!(hosts("r[1,3]n[01-02].ib"), ["r1n01.ib", "r1n02.ib", "r3n01.ib", "r3n02.ib"]);
    }

    #[test]
    fn whitespace_around_items_is_trimmed() {
        assert_eq!(hosts("  n[1-2] , login1\n"), ["n1", "n2", "login1"]);
    }

    #[test]
    fn unbalanced_brackets_are_refused() {
        let message = hostlist_error_message("a,n[1-3");
        assert!(message.contains(r#""a,n[1-3""#) && message.contains(r#"'[' without a matching ']' in "n[1-3""#));
        let message = hostlist_error_message("n1-3],b");
        assert!(message.contains(r#""n1-3],b""#) && message.contains(r#"']' without a matching '[' in "n1-3]""#));
        let message = hostlist_error_message("n[1]]");
        assert!(message.contains("']' without a matching '['"), "{message}");
    }

    #[test]
    fn empty_items_are_refused() {
        let message = hostlist_error_message("a,,b");
        assert!(message.contains(r#""a,,b""#) && message.contains(r#"empty item in """#), "{message}");
        assert!(hostlist_error_message("a,").contains("empty item"));
        assert!(hostlist_error_message(",a").contains("empty item"));
        assert!(hostlist_error_message("  ").contains("is empty"));
        assert!(hostlist_error_message("").contains("is empty"));
    }

    #[test]
    fn backwards_ranges_are_refused() {
        let message = hostlist_error_message("x,n[05-03]");
        assert!(message.contains(r#""x,n[05-03]""#), "{message}");
        assert!(message.contains(r#"range "05-03" has its low bound above its high bound in "n[05-03]""#), "{message}");
    }

    #[test]
    fn non_numeric_bounds_are_refused() {
        let message = hostlist_error_message("n[a-c]");
        assert!(
            message.contains(r#"range "a-c" has a bound "a" that is not a 64-bit decimal number in "n[a-c]""#),
            "{message}"
        );
        for list in ["n[1-]", "n[-3]", "n[1-2-3]", "n[+1]", "n[1:2]", "n[99999999999999999999]"] {
            assert!(hostlist_error_message(list).contains("is not a 64-bit decimal number"), "{list}");
        }
    }

    #[test]
    fn empty_brackets_and_empty_ranges_are_refused() {
        let message = hostlist_error_message("n[]");
        assert!(message.contains(r#"empty brackets in "n[]""#), "{message}");
        assert!(hostlist_error_message("n[1,]").contains("an empty range in [1,]"));
        assert!(hostlist_error_message("n[,1]").contains("an empty range"));
    }

    #[test]
    fn nested_brackets_are_refused() {
        let message = hostlist_error_message("n[1[2]]");
        assert!(message.contains(r#"nested brackets in "n[1[2]]""#), "{message}");
        assert!(hostlist_error_message("n[[1]]").contains("nested brackets"));
    }

    #[test]
    fn whitespace_inside_a_host_name_is_refused() {
        let message = hostlist_error_message("n01 n02");
        assert!(message.contains(r#"whitespace inside a host name in "n01 n02""#), "{message}");
    }

    #[test]
    fn absurdly_large_expansions_are_refused_before_expanding() {
        assert_eq!(hosts("n[1-1000000]").len(), 1_000_000);
        let message = hostlist_error_message("n[0-1000000]");
        assert!(message.contains("expands past the limit of 1000000 hosts in \"n[0-1000000]\""), "{message}");
        // Each item is small; the total is not.
        assert!(hostlist_error_message("a[1-600000],b[1-600000]").contains("limit"));
        // A product of groups that overflows u64 must not wrap around to a small count.
        let huge = "n[0-18446744073709551614]x[0-18446744073709551614]y[0-99]";
        assert!(hostlist_error_message(huge).contains("limit"));
        assert!(hostlist_error_message("n[0-18446744073709551615]").contains("limit"));
    }

    #[test]
    fn tasks_per_node_repetitions_expand() {
        assert_eq!(expand_tasks_per_node("2(x3),1").ok(), Some(vec![2, 2, 2, 1]));
        assert_eq!(expand_tasks_per_node("4").ok(), Some(vec![4]));
        assert_eq!(expand_tasks_per_node("8(x2)").ok(), Some(vec![8, 8]));
        assert_eq!(expand_tasks_per_node(" 1 , 3(x1) ").ok(), Some(vec![1, 3]));
        assert_eq!(expand_tasks_per_node("72(x2),36").ok(), Some(vec![72, 72, 36]));
    }

    #[test]
    fn malformed_tasks_per_node_values_are_refused() {
        let message = format!("{:#}", expand_tasks_per_node("2(x3),a").err().unwrap_or_else(|| anyhow!("accepted")));
        assert!(message.contains(r#""2(x3),a""#) && message.contains(r#"count is not a non-negative integer in "a""#));
        for (value, problem) in [
            ("", "is empty"),
            ("2,,1", "empty item"),
            ("2(x0)", "repetition of zero"),
            ("2(3)", "expected COUNT(xTIMES)"),
            ("2(xa)", "repetition is not a non-negative integer"),
            ("(x2)", "count is not a non-negative integer"),
            ("-1", "count is not a non-negative integer"),
            ("1(x1000001)", "limit of 1000000 entries"),
            ("1(x600000),1(x600000)", "limit of 1000000 entries"),
        ] {
            match expand_tasks_per_node(value) {
                Ok(counts) => panic!("{value:?} should be refused, gave {} counts", counts.len()),
                Err(error) => assert!(format!("{error:#}").contains(problem), "{value:?}: {error:#}"),
            }
        }
    }

    /// A lookup over fixed variables, standing in for the process environment.
    fn lookup(variables: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let variables: HashMap<String, String> =
            variables.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        move |name| variables.get(name).cloned()
    }

    fn allocation(variables: &[(&str, &str)]) -> SlurmAllocation {
        match SlurmAllocation::from_lookup(lookup(variables)) {
            Ok(Some(allocation)) => allocation,
            Ok(None) => panic!("no allocation detected"),
            Err(error) => panic!("detection failed: {error:#}"),
        }
    }

    fn detection_error(variables: &[(&str, &str)]) -> String {
        match SlurmAllocation::from_lookup(lookup(variables)) {
            Ok(found) => panic!("detection should fail, gave {found:?}"),
            Err(error) => format!("{error:#}"),
        }
    }

    #[test]
    fn no_job_id_means_no_allocation() {
        assert_eq!(SlurmAllocation::from_lookup(lookup(&[])).ok(), Some(None));
        let empty_job_id = [("SLURM_JOB_ID", ""), ("SLURM_JOB_NODELIST", "n1")];
        assert_eq!(SlurmAllocation::from_lookup(lookup(&empty_job_id)).ok(), Some(None));
    }

    #[test]
    fn a_two_node_step_is_read_in_full() {
        let found = allocation(&[
            ("SLURM_JOB_ID", "4242137"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
            ("SLURM_NODELIST", "ignored[1-5]"),
            ("SLURM_JOB_NUM_NODES", "2"),
            ("SLURM_NNODES", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_TASKS_PER_NODE", "1(x2)"),
            ("SLURM_GPUS_ON_NODE", "4"),
            ("CUDA_VISIBLE_DEVICES", "0,1"),
            ("SLURM_RESTART_COUNT", "3"),
        ]);
        assert_eq!(
            found,
            SlurmAllocation {
                job_id: "4242137".to_string(),
                array_job_id: None,
                array_task_id: None,
                node_id: Some(1),
                nnodes: 2,
                procid: Some(1),
                localid: Some(0),
                ntasks: Some(2),
                tasks_per_node: vec![1, 1],
                nodes: vec!["gpu07".to_string(), "gpu08".to_string()],
                gpus_on_node: Some(4),
                restart_count: 3,
            }
        );
        assert_eq!(found.master_addr(), "gpu07");
        assert_eq!(found.master_port(), 15000 + 2137);
        assert_eq!(found.requeue_target(), "4242137");
        assert!(found.is_one_task_per_node());
    }

    #[test]
    fn a_batch_script_without_step_variables_gets_defaults() {
        let found = allocation(&[("SLURM_JOB_ID", "17"), ("SLURM_NODELIST", "n[1-3],login")]);
        assert_eq!(found.nodes, ["n1", "n2", "n3", "login"]);
        assert_eq!(found.nnodes, 4, "from the hostlist when no node count is set");
        assert_eq!((found.node_id, found.procid, found.localid, found.ntasks), (None, None, None, None));
        assert!(found.tasks_per_node.is_empty());
        assert_eq!((found.gpus_on_node, found.restart_count), (None, 0));
        assert_eq!(found.master_port(), 15017, "short job ids use all their digits");
        assert!(!found.is_one_task_per_node());
    }

    #[test]
    fn slurm_nnodes_is_used_when_the_job_node_count_is_missing() {
        let found = allocation(&[("SLURM_JOB_ID", "9"), ("SLURM_JOB_NODELIST", "n[1-4]"), ("SLURM_NNODES", "4")]);
        assert_eq!(found.nnodes, 4);
    }

    #[test]
    fn an_array_task_requeues_as_array_and_task_but_takes_its_port_from_its_own_job_id() {
        let found = allocation(&[
            ("SLURM_JOB_ID", "1000123"),
            ("SLURM_ARRAY_JOB_ID", "1000100"),
            ("SLURM_ARRAY_TASK_ID", "23"),
            ("SLURM_JOB_NODELIST", "n01"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_TASKS_PER_NODE", "4"),
        ]);
        assert_eq!((found.array_job_id.as_deref(), found.array_task_id), (Some("1000100"), Some(23)));
        assert_eq!(found.requeue_target(), "1000100_23");
        assert_eq!(found.master_port(), 15123);
        assert_eq!(found.master_addr(), "n01");
        assert!(!found.is_one_task_per_node());
    }

    #[test]
    fn one_task_per_node_follows_ntasks_or_tasks_per_node() {
        let base = [("SLURM_JOB_ID", "5"), ("SLURM_JOB_NODELIST", "n[1-3]")];
        let with = |extra: &[(&'static str, &'static str)]| {
            allocation(&base.iter().chain(extra).copied().collect::<Vec<_>>()).is_one_task_per_node()
        };
        assert!(with(&[("SLURM_NTASKS", "3")]));
        assert!(with(&[("SLURM_TASKS_PER_NODE", "1(x3)")]));
        assert!(!with(&[("SLURM_NTASKS", "6")]));
        assert!(!with(&[("SLURM_TASKS_PER_NODE", "2,1(x2)")]));
    }

    #[test]
    fn garbled_variables_are_named_with_their_values() {
        let base = [("SLURM_JOB_ID", "77"), ("SLURM_JOB_NODELIST", "n[1-2]")];
        for (name, value, expected) in [
            ("SLURM_NTASKS", "two", r#"SLURM_NTASKS="two" is not a non-negative integer"#),
            ("SLURM_PROCID", "-1", r#"SLURM_PROCID="-1" is not a non-negative integer"#),
            ("SLURM_NODEID", "0x1", r#"SLURM_NODEID="0x1" is not a non-negative integer"#),
            ("SLURM_JOB_NUM_NODES", "2.0", r#"SLURM_JOB_NUM_NODES="2.0" is not"#),
            ("SLURM_GPUS_ON_NODE", "gpu:4", r#"SLURM_GPUS_ON_NODE="gpu:4" is not"#),
            ("SLURM_RESTART_COUNT", "x", r#"SLURM_RESTART_COUNT="x" is not"#),
            ("SLURM_ARRAY_TASK_ID", "3a", r#"SLURM_ARRAY_TASK_ID="3a" is not"#),
            ("SLURM_TASKS_PER_NODE", "2(x)", r#"SLURM_TASKS_PER_NODE="2(x)""#),
            ("SLURM_JOB_NODELIST", "n[2-1]", r#"SLURM_JOB_NODELIST="n[2-1]""#),
        ] {
            let mut variables = base.to_vec();
            variables.retain(|(existing, _)| *existing != name);
            variables.push((name, value));
            let message = detection_error(&variables);
            assert!(message.contains(expected), "{name}: {message}");
        }
        let message = detection_error(&[("SLURM_JOB_ID", "12ab"), ("SLURM_JOB_NODELIST", "n1")]);
        assert!(message.contains(r#"SLURM_JOB_ID="12ab" is not a numeric job id"#), "{message}");
    }

    #[test]
    fn missing_nodelist_or_array_task_is_an_error() {
        let message = detection_error(&[("SLURM_JOB_ID", "77")]);
        assert!(message.contains(r#"SLURM_JOB_ID="77" is set but neither SLURM_JOB_NODELIST nor SLURM_NODELIST"#));
        let message =
            detection_error(&[("SLURM_JOB_ID", "77"), ("SLURM_JOB_NODELIST", "n1"), ("SLURM_ARRAY_JOB_ID", "70")]);
        assert!(message.contains(r#"SLURM_ARRAY_JOB_ID="70" is set but SLURM_ARRAY_TASK_ID is not"#), "{message}");
    }

    #[test]
    fn gpu_count_falls_back_to_cuda_visible_devices() {
        let base = [("SLURM_JOB_ID", "8"), ("SLURM_JOB_NODELIST", "n1")];
        let gpus =
            |devices: &'static str| allocation(&[base[0], base[1], ("CUDA_VISIBLE_DEVICES", devices)]).gpus_on_node;
        assert_eq!(gpus("0,1,3"), Some(3));
        assert_eq!(gpus("GPU-5c2a1e9f-aaaa-bbbb-cccc-0123456789ab"), Some(1));
        assert_eq!(gpus(""), None);
        assert_eq!(allocation(&base).gpus_on_node, None);
    }
}
