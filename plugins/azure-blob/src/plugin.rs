//! The component: the `writer` export over Blob REST calls through the host's HTTP.

use std::cell::Cell;
use std::time::{Duration, UNIX_EPOCH};

use haven_plugin_sdk::cloud_writer::{
    Access, Buffer, CreateOptions, Disk, DiskInfo, ExtentState, GuestDisk, MapEntry, OptionPair,
    PluginGuest, PluginInfo, WitError, WriterGuest, now_ms, refuse_unknown_settings, setting,
};
use haven_plugin_sdk::http;

use crate::{Account, MAX_PUT_PAGE, PAGE, Request, allocation, page_ranges};

const SETTINGS: [&str; 5] = ["endpoint", "account", "container", "key", "sas"];
/// Most bytes one read asks for (the host's answers are bounded too).
const MAX_READ: u32 = 16 << 20;

struct AzureBlob;

fn account() -> Result<Account, WitError> {
    refuse_unknown_settings(&SETTINGS)?;
    Account::from_settings(setting).map_err(WitError::InvalidArgument)
}

/// Sends `r` (with `body`) and returns the answer whatever its status.
fn send(a: &Account, r: &Request, body: &[u8]) -> Result<http::Response, WitError> {
    let now = UNIX_EPOCH + Duration::from_millis(now_ms());
    let headers = a.headers(r, now);
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    http::request(r.method, &a.url(r), &refs, body)
}

/// The error an answer with an unexpected status is, naming the blob and the service's code.
fn failure(what: &str, blob: &str, resp: &http::Response) -> WitError {
    let code = resp
        .header("x-ms-error-code")
        .next()
        .unwrap_or("")
        .to_string();
    let text = format!(
        "{what} of blob {blob}: HTTP {} {code}: {}",
        resp.status,
        resp.excerpt(300)
    );
    match resp.status {
        404 => WitError::NotFound(text),
        409 | 412 => WitError::AlreadyExists(text),
        401 | 403 => WitError::Denied(format!(
            "{text} (check the account's `key` or `sas`, and the clock)"
        )),
        _ => WitError::Io(text),
    }
}

fn expect(
    what: &str,
    blob: &str,
    resp: http::Response,
    ok: &[u16],
) -> Result<http::Response, WitError> {
    match ok.contains(&resp.status) {
        true => Ok(resp),
        false => Err(failure(what, blob, &resp)),
    }
}

/// The blob's length, or `None` when there is no such blob. Fails when it is not a page blob.
fn length(a: &Account, blob: &str) -> Result<Option<u64>, WitError> {
    let resp = send(a, &Request::new("HEAD", a.blob_path(blob), &[]), &[])?;
    if resp.status == 404 {
        return Ok(None);
    }
    let resp = expect("properties", blob, resp, &[200])?;
    let kind = resp.header("x-ms-blob-type").next().unwrap_or("");
    if kind != "PageBlob" {
        return Err(WitError::Unsupported(format!(
            "blob {blob} is a {kind}, not a page blob"
        )));
    }
    let len = resp
        .header("content-length")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| WitError::Io(format!("blob {blob}: no content-length in its properties")))?;
    Ok(Some(len))
}

/// Bytes `[offset, offset+len)` of the blob.
fn get(a: &Account, blob: &str, offset: u64, len: u64) -> Result<Vec<u8>, WitError> {
    let mut r = Request::new("GET", a.blob_path(blob), &[]);
    r.headers.push((
        "x-ms-range".into(),
        format!("bytes={offset}-{}", offset + len - 1),
    ));
    let resp = expect("read", blob, send(a, &r, &[])?, &[200, 206])?;
    if resp.body.len() as u64 != len {
        return Err(WitError::Io(format!(
            "read of blob {blob}: asked {len} bytes at {offset}, got {}",
            resp.body.len()
        )));
    }
    Ok(resp.body)
}

/// Writes `data` at `offset` (page-aligned) with Put Page.
fn put_pages(a: &Account, blob: &str, offset: u64, data: &[u8]) -> Result<(), WitError> {
    let mut done = 0u64;
    while done < data.len() as u64 {
        let n = (data.len() as u64 - done).min(MAX_PUT_PAGE);
        let at = offset + done;
        let mut r = Request::new("PUT", a.blob_path(blob), &[("comp", "page")]);
        r.headers
            .push(("x-ms-range".into(), format!("bytes={at}-{}", at + n - 1)));
        r.headers.push(("x-ms-page-write".into(), "update".into()));
        r.content_length = n;
        let chunk = &data[done as usize..(done + n) as usize];
        expect("page write", blob, send(a, &r, chunk)?, &[201])?;
        done += n;
    }
    Ok(())
}

/// The VHD size of the page blob `blob` of length `len`, from its footer.
fn vhd_size(a: &Account, blob: &str, len: u64) -> Result<u64, WitError> {
    let footer_at = len.checked_sub(PAGE).ok_or_else(|| {
        WitError::Corrupt(format!(
            "blob {blob} is {len} bytes: too short for a VHD footer"
        ))
    })?;
    let footer: [u8; haven_image::vhd::FOOTER_SIZE] = get(a, blob, footer_at, PAGE)?
        .try_into()
        .map_err(|_| WitError::Io(format!("blob {blob}: a footer of the wrong size")))?;
    let size = haven_image::vhd::fixed_size(&footer, blob, footer_at)
        .map_err(haven_plugin_sdk::cloud_writer::to_wit)?;
    if size != footer_at {
        return Err(WitError::Corrupt(format!(
            "blob {blob}: its VHD footer says {size} bytes but the data before it is {footer_at}"
        )));
    }
    Ok(size)
}

impl PluginGuest for AzureBlob {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "azure-blob".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            kinds: vec!["vhd".into()],
        }
    }
}

impl WriterGuest for AzureBlob {
    type Disk = PageBlob;

    fn probe(path: String) -> Result<Option<String>, WitError> {
        let a = account()?;
        let Some(len) = length(&a, &path)? else {
            return Err(WitError::NotFound(format!(
                "no blob {path} in container {}",
                a.container
            )));
        };
        Ok(vhd_size(&a, &path, len).ok().map(|_| "fixed".to_string()))
    }
}

/// An open page blob.
pub struct PageBlob {
    account: Account,
    blob: String,
    size: u64,
    writable: bool,
    closed: Cell<bool>,
}

impl PageBlob {
    fn check(&self, offset: u64, len: u64, write: bool) -> Result<(), WitError> {
        if self.closed.get() {
            return Err(WitError::InvalidArgument(format!(
                "blob {}: the disk is closed",
                self.blob
            )));
        }
        if write && !self.writable {
            return Err(WitError::Denied(format!(
                "blob {} is open read-only",
                self.blob
            )));
        }
        let aligned = offset.is_multiple_of(PAGE) && len.is_multiple_of(PAGE);
        if !aligned || offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(WitError::InvalidArgument(format!(
                "blob {}: range {offset}+{len} is not 512-byte aligned within its {} bytes",
                self.blob, self.size
            )));
        }
        Ok(())
    }
}

impl GuestDisk for PageBlob {
    fn create(path: String, options: CreateOptions) -> Result<Disk, WitError> {
        let a = account()?;
        if let Some(o) = options.options.first() {
            return Err(WitError::InvalidArgument(format!(
                "azure-blob takes no format options; `{}` is not one",
                o.key
            )));
        }
        if options.sector_size != PAGE as u32 {
            return Err(WitError::InvalidArgument(format!(
                "sector size {}: page blobs hold 512-byte sectors",
                options.sector_size
            )));
        }
        let footer = haven_image::vhd::fixed_footer(options.size)
            .map_err(haven_plugin_sdk::cloud_writer::to_wit)?;
        // The container, once (an existing one is fine). A SAS is scoped to what the operator
        // made: the container is theirs to create.
        if matches!(a.auth, crate::Auth::SharedKey(_)) {
            let r = Request::new("PUT", a.container_path(), &[("restype", "container")]);
            expect(
                "container creation",
                &a.container,
                send(&a, &r, &[])?,
                &[201, 409],
            )?;
        }
        let mut r = Request::new("PUT", a.blob_path(&path), &[]);
        r.headers.push(("x-ms-blob-type".into(), "PageBlob".into()));
        r.headers.push((
            "x-ms-blob-content-length".into(),
            (options.size + PAGE).to_string(),
        ));
        r.headers.push(("if-none-match".into(), "*".into()));
        expect("creation", &path, send(&a, &r, &[])?, &[201])?;
        put_pages(&a, &path, options.size, &footer)?;
        Ok(Disk::new(PageBlob {
            account: a,
            blob: path,
            size: options.size,
            writable: true,
            closed: Cell::new(false),
        }))
    }

    fn open(path: String, access: Access, options: Vec<OptionPair>) -> Result<Disk, WitError> {
        let a = account()?;
        if let Some(o) = options
            .iter()
            .find(|o| !(o.key == "subformat" && o.value == "fixed"))
        {
            return Err(WitError::InvalidArgument(format!(
                "azure-blob keeps fixed VHDs only; option `{}={}` does not apply",
                o.key, o.value
            )));
        }
        let len = length(&a, &path)?.ok_or_else(|| {
            WitError::NotFound(format!("no blob {path} in container {}", a.container))
        })?;
        let size = vhd_size(&a, &path, len)?;
        Ok(Disk::new(PageBlob {
            account: a,
            blob: path,
            size,
            writable: matches!(access, Access::ReadWrite),
            closed: Cell::new(false),
        }))
    }

    fn info(&self) -> Result<DiskInfo, WitError> {
        Ok(DiskInfo {
            format: "vhd".into(),
            subformat: "fixed".into(),
            size: self.size,
            sector_size: PAGE as u32,
            files: vec![self.blob.clone()],
            allocated_bytes: self.size + PAGE,
        })
    }

    fn read(&self, offset: u64, dst: &Buffer, dst_offset: u32, len: u32) -> Result<(), WitError> {
        self.check(offset, u64::from(len), false)?;
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(MAX_READ);
            let at = offset + u64::from(done);
            // Holes read as zeros from the service too; one request per piece.
            let data = get(&self.account, &self.blob, at, u64::from(n))?;
            dst.write(dst_offset + done, &data)?;
            done += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, src: &Buffer, src_offset: u32, len: u32) -> Result<(), WitError> {
        self.check(offset, u64::from(len), true)?;
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(MAX_PUT_PAGE as u32);
            let data = src.read(src_offset + done, n)?;
            put_pages(&self.account, &self.blob, offset + u64::from(done), &data)?;
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _discard: bool) -> Result<(), WitError> {
        self.check(offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        // Cleared pages read as zeros and hold no data: always a discard.
        let mut r = Request::new(
            "PUT",
            self.account.blob_path(&self.blob),
            &[("comp", "page")],
        );
        r.headers.push((
            "x-ms-range".into(),
            format!("bytes={offset}-{}", offset + len - 1),
        ));
        r.headers.push(("x-ms-page-write".into(), "clear".into()));
        expect(
            "page clear",
            &self.blob,
            send(&self.account, &r, &[])?,
            &[201],
        )?;
        Ok(())
    }

    fn flush(&self) -> Result<(), WitError> {
        // Every answered Put Page is durable in the storage account.
        self.check(0, 0, false)
    }

    fn allocation_map(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>, WitError> {
        self.check(offset, len, false)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut r = Request::new(
            "GET",
            self.account.blob_path(&self.blob),
            &[("comp", "pagelist")],
        );
        r.headers.push((
            "x-ms-range".into(),
            format!("bytes={offset}-{}", offset + len - 1),
        ));
        let resp = expect(
            "page ranges",
            &self.blob,
            send(&self.account, &r, &[])?,
            &[200],
        )?;
        let ranges = page_ranges(&String::from_utf8_lossy(&resp.body))
            .map_err(|e| WitError::Io(format!("blob {}: {e}", self.blob)))?;
        Ok(allocation(&ranges, offset, len)
            .into_iter()
            .map(|(offset, length, data)| MapEntry {
                offset,
                length,
                state: if data {
                    ExtentState::Data
                } else {
                    ExtentState::Zero
                },
            })
            .collect())
    }

    fn close(&self) -> Result<(), WitError> {
        self.closed.set(true);
        Ok(())
    }
}

haven_plugin_sdk::export_cloud_writer!(AzureBlob);
