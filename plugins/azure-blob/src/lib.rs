//! Replica disks as fixed VHDs in Azure page blobs, over the Blob REST API.
//!
//! A disk at path `P` is the page blob `P` in the container the operator names: its data, then
//! the 512-byte VHD footer in the blob's last page, so the blob is exactly what an Azure
//! managed disk is imported from (whole MiB plus the footer). Writes are Put Page (`update`,
//! at most [`MAX_PUT_PAGE`] bytes per request, 512-byte aligned as every call of the contract
//! is); zero writes are Put Page `clear`, which frees the pages; the allocation map is Get Page
//! Ranges. A Put Page that was answered is durable in the storage account, so `flush` has
//! nothing left to do.
//!
//! Requests are signed with the account's Shared Key (`Authorization: SharedKey`, HMAC-SHA256
//! of the canonical request) or carry a SAS token the operator gives instead, and go only to
//! the endpoint's host, which the instance must be granted (`http_hosts`).
//!
//! Endpoints and signing are `haven-blob-rest`'s, shared with the native parts that speak to
//! storage accounts. This file holds what runs natively too (page-range lists, allocation
//! maps); `plugin.rs` is the component's side, over the host's HTTP.

pub use haven_blob_rest::{API_VERSION, Account, Auth, Request};

#[cfg(target_arch = "wasm32")]
mod plugin;

/// Most bytes one Put Page writes (the service's limit).
pub const MAX_PUT_PAGE: u64 = 4 << 20;
/// Page size: every offset and length of a page write is a multiple of it.
pub const PAGE: u64 = 512;

/// The page ranges of a Get Page Ranges answer (`<PageRange><Start>…</Start><End>…</End>`,
/// `End` inclusive), as `(offset, length)` in order; clear ranges are left out.
pub fn page_ranges(xml: &str) -> Result<Vec<(u64, u64)>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("page ranges: {e}"))?;
    let mut out = Vec::new();
    for r in doc.descendants().filter(|n| n.has_tag_name("PageRange")) {
        let field = |name: &str| -> Result<u64, String> {
            r.children()
                .find(|c| c.has_tag_name(name))
                .and_then(|c| c.text())
                .and_then(|t| t.trim().parse().ok())
                .ok_or_else(|| format!("page ranges: a range without a numeric <{name}>"))
        };
        let (start, end) = (field("Start")?, field("End")?);
        if end < start {
            return Err(format!(
                "page ranges: range {start}..{end} ends before it starts"
            ));
        }
        out.push((start, end - start + 1));
    }
    out.sort_unstable();
    Ok(out)
}

/// The allocation map of `[offset, offset+len)` from a blob's page ranges: data where a range
/// covers it, zero elsewhere; consecutive, in order, covering the whole span.
pub fn allocation(ranges: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |o: u64, l: u64, data: bool| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, data)),
        }
    };
    let mut at = offset;
    for &(s, l) in ranges {
        let (s, e) = (s.max(offset), (s + l).min(end));
        if e <= s || e <= at {
            continue;
        }
        let s = s.max(at);
        push(at, s - at, false);
        push(s, e - s, true);
        at = e;
    }
    push(at, end - at, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_ranges_become_a_whole_allocation_map() {
        let xml = "<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList>\
            <PageRange><Start>1024</Start><End>2047</End></PageRange>\
            <ClearRange><Start>2048</Start><End>4095</End></ClearRange>\
            <PageRange><Start>4096</Start><End>8191</End></PageRange></PageList>";
        let ranges = page_ranges(xml).unwrap();
        assert_eq!(ranges, vec![(1024, 1024), (4096, 4096)]);
        assert_eq!(
            allocation(&ranges, 0, 10240),
            vec![
                (0, 1024, false),
                (1024, 1024, true),
                (2048, 2048, false),
                (4096, 4096, true),
                (8192, 2048, false)
            ]
        );
        assert_eq!(
            allocation(&ranges, 1536, 3072),
            vec![(1536, 512, true), (2048, 2048, false), (4096, 512, true)]
        );
        assert_eq!(allocation(&[], 0, 512), vec![(0, 512, false)]);
        assert!(
            page_ranges("<PageList><PageRange><Start>9</Start></PageRange></PageList>").is_err()
        );
    }
}
