//! The two renderings `qemu-img check` prints of a [`CheckReport`] (the
//! human summary and the JSON object) and its exit code. The report itself
//! is data produced by the repair service (`crate::repair`).

use super::CheckReport;
use serde::Serialize;

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The JSON object `qemu-img check --output json` prints, keys in QEMU's
/// order (its dictionary's iteration order); zero counters are omitted
/// except `check-errors`.
#[derive(Serialize)]
struct JsonView<'a> {
    #[serde(rename = "image-end-offset", skip_serializing_if = "is_zero")]
    image_end_offset: u64,
    #[serde(rename = "compressed-clusters", skip_serializing_if = "is_zero")]
    compressed_clusters: u64,
    #[serde(rename = "total-clusters", skip_serializing_if = "is_zero")]
    total_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(rename = "corruptions-fixed", skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
    #[serde(rename = "check-errors")]
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(rename = "leaks-fixed", skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(rename = "allocated-clusters", skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    filename: &'a str,
    format: &'a str,
    #[serde(rename = "fragmented-clusters", skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
}

impl Serialize for CheckReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = &self.counts;
        JsonView {
            image_end_offset: c.image_end_offset,
            compressed_clusters: c.compressed_clusters,
            total_clusters: c.total_clusters,
            corruptions: c.corruptions,
            corruptions_fixed: c.corruptions_fixed,
            check_errors: c.check_errors,
            leaks: c.leaks,
            leaks_fixed: c.leaks_fixed,
            allocated_clusters: c.allocated_clusters,
            filename: &self.filename,
            format: &self.format,
            fragmented_clusters: c.fragmented_clusters,
        }
        .serialize(s)
    }
}

impl CheckReport {
    /// The JSON object in QEMU's layout (4-space indent, one key per line),
    /// without a trailing newline.
    pub fn to_json(&self) -> String {
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        // Serializing plain integers and strings into a Vec cannot fail.
        if self.serialize(&mut ser).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// The stdout summary of `qemu-img check` for these counters (QEMU's
    /// `dump_human_image_check`), each line ending in a newline.
    pub fn human_summary(&self) -> String {
        let c = &self.counts;
        let mut s = String::new();
        if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if c.corruptions != 0 {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further \
                     writes to the image may corrupt it.\n",
                    c.corruptions
                ));
            }
            if c.leaks != 0 {
                s.push_str(&format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                     space, but no harm to data.\n",
                    c.leaks
                ));
            }
            if c.check_errors != 0 {
                s.push_str(&format!(
                    "\n{} internal errors have occurred during the check.\n",
                    c.check_errors
                ));
            }
        }
        if c.total_clusters != 0 && c.allocated_clusters != 0 {
            let pct = |a: u64, b: u64| a as f64 * 100.0 / b as f64;
            s.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                c.allocated_clusters,
                c.total_clusters,
                pct(c.allocated_clusters, c.total_clusters),
                pct(c.fragmented_clusters, c.allocated_clusters),
                pct(c.compressed_clusters, c.allocated_clusters),
            ));
        }
        if c.image_end_offset != 0 {
            s.push_str(&format!("Image end offset: {}\n", c.image_end_offset));
        }
        s
    }

    /// The paragraph `qemu-img check -r` prints before the double check.
    pub fn repaired_paragraph(leaks_fixed: u64, corruptions_fixed: u64) -> String {
        format!(
            "The following inconsistencies were found and repaired:\n\n    {leaks_fixed} leaked \
             clusters\n    {corruptions_fixed} corruptions\n\nDouble checking the fixed image \
             now...\n"
        )
    }

    /// `qemu-img check`'s exit code for this result: 1 if there were check
    /// errors, 2 for corruptions, 3 for leaks only, 0 otherwise.
    pub fn exit_code(&self) -> i32 {
        let c = &self.counts;
        if c.check_errors != 0 {
            1
        } else if c.corruptions != 0 {
            2
        } else if c.leaks != 0 {
            3
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::CheckCounts;

    #[test]
    fn json_layout_and_omitted_keys() {
        let r = CheckReport {
            counts: CheckCounts {
                image_end_offset: 393216,
                compressed_clusters: 3,
                total_clusters: 256,
                allocated_clusters: 3,
                fragmented_clusters: 3,
                ..Default::default()
            },
            filename: "comp.qcow2".into(),
            format: "qcow2".into(),
            ..Default::default()
        };
        assert_eq!(
            r.to_json(),
            "{\n    \"image-end-offset\": 393216,\n    \"compressed-clusters\": 3,\n    \
             \"total-clusters\": 256,\n    \"check-errors\": 0,\n    \"allocated-clusters\": \
             3,\n    \"filename\": \"comp.qcow2\",\n    \"format\": \"qcow2\",\n    \
             \"fragmented-clusters\": 3\n}"
        );
    }

    #[test]
    fn human_summary_matches_qemu() {
        let r = CheckReport {
            counts: CheckCounts {
                leaks: 1,
                image_end_offset: 1441792,
                total_clusters: 1024,
                allocated_clusters: 17,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            r.human_summary(),
            "\n1 leaked clusters were found on the image.\nThis means waste of disk space, but \
             no harm to data.\n17/1024 = 1.66% allocated, 0.00% fragmented, 0.00% compressed \
             clusters\nImage end offset: 1441792\n"
        );
        assert_eq!(r.exit_code(), 3);
    }
}
