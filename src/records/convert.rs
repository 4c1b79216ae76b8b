//! wav → mp3: symphonia decodes, LAME encodes, one packet (~1152 frames) at a time, so a
//! one-hour recording never sits in memory. The output goes to a temp file in the target
//! folder and is renamed into place only when complete, so a reader never sees half an mp3.
//!
//! [`convert_file`] is the synchronous core (used by `kolokol convert`); [`Converter`] runs
//! it on a bounded slice of the blocking pool with a timeout, for the daemon.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mp3lame_encoder::{
    Bitrate, Builder, FlushGap, InterleavedPcm, Mode, MonoPcm, Quality, VbrMode,
};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::{RecordError, RecordsConfig};

/// Encoder settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertSettings {
    /// CBR bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// LAME quality 0 (best) ..= 9 (fastest).
    pub quality: u8,
    /// Output sample rate; 0 lets LAME choose (it keeps 8 kHz for 8 kHz input).
    pub sample_rate: u32,
    /// Mix stereo down to mono.
    pub downmix: bool,
    /// Largest input accepted, bytes.
    pub max_file_bytes: u64,
}

impl Default for ConvertSettings {
    fn default() -> Self {
        // Same as the config defaults.
        Self::from_config(&RecordsConfig::default()).unwrap_or(ConvertSettings {
            bitrate_kbps: 32,
            quality: 5,
            sample_rate: 0,
            downmix: true,
            max_file_bytes: 1 << 30,
        })
    }
}

const VALID_BITRATES: [u32; 16] = [
    8, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
];
const VALID_RATES: [u32; 9] = [8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000];

fn lame_bitrate(kbps: u32) -> Option<Bitrate> {
    Some(match kbps {
        8 => Bitrate::Kbps8,
        16 => Bitrate::Kbps16,
        24 => Bitrate::Kbps24,
        32 => Bitrate::Kbps32,
        40 => Bitrate::Kbps40,
        48 => Bitrate::Kbps48,
        64 => Bitrate::Kbps64,
        80 => Bitrate::Kbps80,
        96 => Bitrate::Kbps96,
        112 => Bitrate::Kbps112,
        128 => Bitrate::Kbps128,
        160 => Bitrate::Kbps160,
        192 => Bitrate::Kbps192,
        224 => Bitrate::Kbps224,
        256 => Bitrate::Kbps256,
        320 => Bitrate::Kbps320,
        _ => return None,
    })
}

fn lame_quality(q: u8) -> Quality {
    match q {
        0 => Quality::Best,
        1 => Quality::SecondBest,
        2 => Quality::NearBest,
        3 => Quality::VeryNice,
        4 => Quality::Nice,
        5 => Quality::Good,
        6 => Quality::Decent,
        7 => Quality::Ok,
        8 => Quality::SecondWorst,
        _ => Quality::Worst,
    }
}

impl ConvertSettings {
    pub fn from_config(cfg: &RecordsConfig) -> Result<Self, RecordError> {
        let s = ConvertSettings {
            bitrate_kbps: cfg.bitrate_kbps,
            quality: cfg.quality,
            sample_rate: cfg.sample_rate,
            downmix: cfg.downmix,
            max_file_bytes: cfg.max_file_mb.saturating_mul(1 << 20),
        };
        s.validate()?;
        Ok(s)
    }

    /// Check the values LAME would otherwise reject at the first conversion.
    pub fn validate(&self) -> Result<(), RecordError> {
        if lame_bitrate(self.bitrate_kbps).is_none() {
            return Err(RecordError::Config {
                key: "bitrate_kbps",
                detail: format!(
                    "{} is not an mp3 bitrate; use one of {VALID_BITRATES:?}",
                    self.bitrate_kbps
                ),
            });
        }
        if self.quality > 9 {
            return Err(RecordError::Config {
                key: "quality",
                detail: format!("{} is outside 0 (best) ..= 9 (fastest)", self.quality),
            });
        }
        if self.sample_rate != 0 && !VALID_RATES.contains(&self.sample_rate) {
            return Err(RecordError::Config {
                key: "sample_rate",
                detail: format!(
                    "{} Hz is not an mp3 rate; use 0 (automatic) or one of {VALID_RATES:?}",
                    self.sample_rate
                ),
            });
        }
        Ok(())
    }
}

/// What one conversion did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    pub src: PathBuf,
    pub dst: PathBuf,
    /// Input codec as symphonia names it (`pcm_s16le`, `pcm_mulaw`, ...).
    pub codec: String,
    pub sample_rate: u32,
    pub channels: usize,
    /// Channels in the mp3 (1 when downmixed).
    pub out_channels: u8,
    /// Audio frames decoded (samples per channel).
    pub frames: u64,
    /// Length of the audio.
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub elapsed: Duration,
}

/// Removes the temp file unless the conversion completed.
struct TempGuard {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn temp_path(dst: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "recording.mp3".into());
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // Leading dot + suffix: never matched by the catalog's `<id>.mp3` lookup.
    dst.with_file_name(format!(".{name}.tmp-{}-{seq}", std::process::id()))
}

fn classify(src: &Path, what: &'static str, e: SymError) -> RecordError {
    match e {
        SymError::Unsupported(detail) => RecordError::Unsupported {
            path: src.to_path_buf(),
            what,
            detail: detail.to_string(),
        },
        SymError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            RecordError::Corrupt {
                path: src.to_path_buf(),
                detail: format!("{what} ends early"),
            }
        }
        SymError::IoError(io) => RecordError::io("reading", src, io),
        other => RecordError::Corrupt {
            path: src.to_path_buf(),
            detail: format!("{what}: {other}"),
        },
    }
}

/// Convert `src` (any wav symphonia decodes: PCM 8/16/24/32-bit, float, µ-law, A-law,
/// IMA/MS ADPCM; any rate; mono or stereo) to an mp3 at `dst`.
///
/// Streams: memory use is a few packets regardless of length. On any error `dst` is left
/// untouched and no temp file remains.
pub fn convert_file(
    src: &Path,
    dst: &Path,
    settings: &ConvertSettings,
) -> Result<ConvertReport, RecordError> {
    let started = Instant::now();
    settings.validate()?;
    let file = File::open(src).map_err(|e| RecordError::io("opening", src, e))?;
    let bytes_in = file
        .metadata()
        .map_err(|e| RecordError::io("reading the size of", src, e))?
        .len();
    if bytes_in == 0 {
        return Err(RecordError::Empty {
            path: src.to_path_buf(),
        });
    }
    if bytes_in > settings.max_file_bytes {
        return Err(RecordError::TooLarge {
            path: src.to_path_buf(),
            size: bytes_in,
            limit_mb: settings.max_file_bytes >> 20,
        });
    }

    let mss = MediaSourceStream::new(
        Box::new(file),
        MediaSourceStreamOptions {
            buffer_len: 64 * 1024,
        },
    );
    let mut hint = Hint::new();
    if let Some(ext) = src.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            mss,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| classify(src, "the file format", e))?;
    let mut reader = probed.format;
    let track = reader
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| RecordError::Unsupported {
            path: src.to_path_buf(),
            what: "the file",
            detail: "no audio track".into(),
        })?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let codec = symphonia::default::get_codecs()
        .get_codec(params.codec)
        .map(|d| d.short_name.to_string())
        .unwrap_or_else(|| format!("{}", params.codec));
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| classify(src, "the audio codec", e))?;
    let sample_rate = params.sample_rate.ok_or_else(|| RecordError::Corrupt {
        path: src.to_path_buf(),
        detail: "no sample rate in the header".into(),
    })?;
    let channels = params.channels.map(|c| c.count()).unwrap_or(1);
    if channels == 0 || sample_rate == 0 {
        return Err(RecordError::Corrupt {
            path: src.to_path_buf(),
            detail: format!("{channels} channels at {sample_rate} Hz"),
        });
    }
    let out_channels: u8 = if settings.downmix || channels == 1 {
        1
    } else {
        2
    };

    let mode = if cbr_keeps_tag(settings, sample_rate, out_channels)? {
        RateMode::Cbr
    } else {
        RateMode::Abr
    };
    let mut encoder = build_encoder(settings, sample_rate, out_channels, mode)?;

    let tmp = temp_path(dst);
    let mut guard = TempGuard {
        path: tmp.clone(),
        keep: false,
    };
    let out_file = File::create(&tmp).map_err(|e| RecordError::io("creating", &tmp, e))?;
    let mut out = BufWriter::with_capacity(64 * 1024, out_file);

    let mut samples: Option<SampleBuffer<i16>> = None;
    let mut mixed: Vec<i16> = Vec::new();
    let mut mp3: Vec<u8> = Vec::new();
    let mut frames: u64 = 0;

    loop {
        let packet = match reader.next_packet() {
            Ok(p) => p,
            // The normal end of the stream in symphonia.
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(e) => return Err(classify(src, "the audio data", e)),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = decoder
            .decode(&packet)
            .map_err(|e| classify(src, "the audio data", e))?;
        let n = decoded.frames();
        if n == 0 {
            continue;
        }
        let spec = *decoded.spec();
        let in_ch = spec.channels.count().max(1);
        let buf = match &mut samples {
            Some(b) if b.capacity() >= n * in_ch => b,
            _ => samples.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        let pcm = buf.samples();
        mp3.clear();
        mp3.reserve(mp3lame_encoder::max_required_buffer_size(n));
        let written = if out_channels == 1 {
            let mono: &[i16] = if in_ch == 1 {
                pcm
            } else {
                mixed.clear();
                mixed.extend(pcm.chunks_exact(in_ch).map(|f| {
                    let sum: i32 = f.iter().map(|&s| i32::from(s)).sum();
                    (sum / in_ch as i32) as i16
                }));
                &mixed
            };
            encoder.encode_to_vec(MonoPcm(mono), &mut mp3)
        } else if in_ch == 2 {
            encoder.encode_to_vec(InterleavedPcm(pcm), &mut mp3)
        } else {
            // More than two channels: keep the first two.
            mixed.clear();
            for f in pcm.chunks_exact(in_ch) {
                mixed.extend_from_slice(&f[..2]);
            }
            encoder.encode_to_vec(InterleavedPcm(&mixed), &mut mp3)
        }
        .map_err(|e| RecordError::Encoder {
            detail: format!("{e}"),
        })?;
        debug_assert_eq!(written, mp3.len());
        out.write_all(&mp3)
            .map_err(|e| RecordError::io("writing", &tmp, e))?;
        frames += n as u64;
    }

    if let Some(expected) = params.n_frames
        && frames < expected
    {
        return Err(RecordError::Truncated {
            path: src.to_path_buf(),
            expected,
            decoded: frames,
        });
    }
    if frames == 0 {
        return Err(RecordError::Corrupt {
            path: src.to_path_buf(),
            detail: "no audio samples in the file".into(),
        });
    }

    mp3.clear();
    mp3.reserve(7200);
    encoder
        .flush_to_vec::<FlushGap>(&mut mp3)
        .map_err(|e| RecordError::Encoder {
            detail: format!("{e}"),
        })?;
    out.write_all(&mp3)
        .map_err(|e| RecordError::io("writing", &tmp, e))?;
    let mut out_file = out
        .into_inner()
        .map_err(|e| RecordError::io("writing", &tmp, e.into_error()))?;

    // The LAME/Info tag replaces the placeholder first frame: it carries the exact length
    // and the encoder delay/padding, so players show the right duration and trim the
    // silence LAME adds.
    if encoder.is_lame_tag_written() {
        let mut tag = Vec::with_capacity(encoder.lame_tag_size());
        if encoder.lame_tag_encode_to_vec(&mut tag).is_some() {
            out_file
                .seek(SeekFrom::Start(0))
                .and_then(|_| out_file.write_all(&tag))
                .map_err(|e| RecordError::io("writing", &tmp, e))?;
        }
    }
    let bytes_out = out_file
        .seek(SeekFrom::End(0))
        .map_err(|e| RecordError::io("writing", &tmp, e))?;
    // The mp3 may replace the only copy (keep_wav = false): make it durable first.
    out_file
        .sync_data()
        .map_err(|e| RecordError::io("syncing", &tmp, e))?;
    drop(out_file);
    std::fs::rename(&tmp, dst).map_err(|e| RecordError::io("renaming the mp3 to", dst, e))?;
    guard.keep = true;

    Ok(ConvertReport {
        src: src.to_path_buf(),
        dst: dst.to_path_buf(),
        codec,
        sample_rate,
        channels,
        out_channels,
        frames,
        duration: Duration::from_secs_f64(frames as f64 / f64::from(sample_rate)),
        bytes_in,
        bytes_out,
        elapsed: started.elapsed(),
    })
}

/// How the bitrate is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RateMode {
    /// Constant bitrate: the most compatible, and fastest.
    Cbr,
    /// Average bitrate at the same target. Used only when a CBR frame at the chosen rate is
    /// too small for LAME's Info tag (e.g. 32 kbit/s at 16-24 kHz): without the tag players
    /// cannot trim the encoder delay and padding, and the mp3 is ~0.1 s longer than the call.
    Abr,
}

fn build_encoder(
    settings: &ConvertSettings,
    sample_rate: u32,
    channels: u8,
    mode: RateMode,
) -> Result<mp3lame_encoder::Encoder, RecordError> {
    let err = |what: &str, e: mp3lame_encoder::BuildError| RecordError::Encoder {
        detail: format!("{what}: {e}"),
    };
    let mut b = Builder::new().ok_or_else(|| RecordError::Encoder {
        detail: "LAME could not allocate its state".into(),
    })?;
    let bitrate = lame_bitrate(settings.bitrate_kbps).ok_or_else(|| RecordError::Config {
        key: "bitrate_kbps",
        detail: format!("{} is not an mp3 bitrate", settings.bitrate_kbps),
    })?;
    b.set_num_channels(channels)
        .map_err(|e| err("channels", e))?;
    b.set_sample_rate(sample_rate)
        .map_err(|e| err("sample rate", e))?;
    b.set_output_sample_rate(NonZeroU32::new(settings.sample_rate))
        .map_err(|e| err("output sample rate", e))?;
    match mode {
        RateMode::Cbr => {
            b.set_brate(bitrate).map_err(|e| err("bitrate", e))?;
            b.set_vbr_mode(VbrMode::Off)
                .map_err(|e| err("CBR mode", e))?;
        }
        RateMode::Abr => {
            b.set_vbr_mode(VbrMode::Abr)
                .map_err(|e| err("ABR mode", e))?;
            let kbps = i32::try_from(settings.bitrate_kbps).unwrap_or(32);
            // SAFETY: `as_ptr` is the live LAME state owned by `b`; this setter only stores
            // an int in it. The wrapper has no safe method for the ABR target.
            let rc =
                unsafe { mp3lame_encoder::ffi::lame_set_VBR_mean_bitrate_kbps(b.as_ptr(), kbps) };
            if rc != 0 {
                return Err(RecordError::Encoder {
                    detail: format!("ABR target {kbps} kbit/s refused ({rc})"),
                });
            }
        }
    }
    b.set_mode(if channels == 1 {
        Mode::Mono
    } else {
        Mode::JointStereo
    })
    .map_err(|e| err("mode", e))?;
    b.set_quality(lame_quality(settings.quality))
        .map_err(|e| err("quality", e))?;
    b.set_to_write_vbr_tag(true)
        .map_err(|e| err("info tag", e))?;
    b.build().map_err(|e| {
        err(
            &format!(
                "{sample_rate} Hz, {channels} ch, {} kbit/s",
                settings.bitrate_kbps
            ),
            e,
        )
    })
}

/// Whether LAME keeps its Info tag in CBR for this input: it drops the tag when one frame
/// at the chosen output rate and bitrate cannot hold it. LAME picks the output rate itself,
/// so ask it: encode a few frames of silence and see whether a tag exists.
fn cbr_keeps_tag(
    settings: &ConvertSettings,
    sample_rate: u32,
    channels: u8,
) -> Result<bool, RecordError> {
    let mut enc = build_encoder(settings, sample_rate, channels, RateMode::Cbr)?;
    let silence = vec![0i16; 1152 * 8 * usize::from(channels)];
    let mut out = Vec::with_capacity(mp3lame_encoder::max_required_buffer_size(silence.len()));
    let res = if channels == 1 {
        enc.encode_to_vec(MonoPcm(&silence), &mut out)
    } else {
        enc.encode_to_vec(InterleavedPcm(&silence), &mut out)
    };
    res.map_err(|e| RecordError::Encoder {
        detail: format!("{e}"),
    })?;
    Ok(enc.lame_tag_size() > 0)
}

/// Runs conversions for the daemon: at most `slots` at once on the blocking pool, each with
/// the configured timeout. Cheap to clone.
#[derive(Clone)]
pub struct Converter {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ConvertSettings,
    permits: Arc<Semaphore>,
    slots: usize,
    /// Conversions started and not finished (waiting for a slot or running).
    in_flight: AtomicUsize,
    max_queued: usize,
    timeout: Duration,
    keep_wav: bool,
}

/// Decrements the in-flight count however the task ends.
struct InFlight(Arc<Inner>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Converter {
    pub fn new(cfg: &RecordsConfig) -> Result<Self, RecordError> {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let slots = if cfg.max_concurrent == 0 {
            cores
        } else {
            cfg.max_concurrent.min(cores)
        };
        Ok(Converter {
            inner: Arc::new(Inner {
                settings: ConvertSettings::from_config(cfg)?,
                permits: Arc::new(Semaphore::new(slots)),
                slots,
                in_flight: AtomicUsize::new(0),
                max_queued: cfg.max_queued,
                timeout: cfg.convert_timeout,
                keep_wav: cfg.keep_wav,
            }),
        })
    }

    /// Conversions that may run at once.
    pub fn slots(&self) -> usize {
        self.inner.slots
    }

    /// Start converting in the background; the handle yields the result whenever it is done.
    /// Refused at once (`Busy`) when `max_queued` conversions are already waiting.
    pub fn start(
        &self,
        src: &Path,
        dst: &Path,
    ) -> Result<JoinHandle<Result<ConvertReport, RecordError>>, RecordError> {
        let inner = self.inner.clone();
        let before = inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(inner.clone());
        if before >= inner.max_queued + inner.slots {
            drop(guard);
            return Err(RecordError::Busy {
                path: src.to_path_buf(),
                queued: before.saturating_sub(inner.slots),
            });
        }
        let src = src.to_path_buf();
        let dst = dst.to_path_buf();
        Ok(tokio::spawn(async move {
            let permit =
                inner
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| RecordError::Worker {
                        path: src.clone(),
                        detail: "conversion pool closed".into(),
                    })?;
            let settings = inner.settings.clone();
            let (s, d) = (src.clone(), dst.clone());
            let res = tokio::task::spawn_blocking(move || {
                // The permit lives as long as the blocking work, even after a timeout.
                let _permit = permit;
                convert_file(&s, &d, &settings)
            })
            .await
            .map_err(|e| RecordError::Worker {
                path: src.clone(),
                detail: e.to_string(),
            })?;
            match &res {
                Ok(r) => tracing::debug!(src = %src.display(), dst = %dst.display(),
                    ms = r.elapsed.as_millis() as u64, "conversion finished"),
                Err(e) => tracing::warn!(src = %src.display(), error = %e, "conversion failed"),
            }
            drop(guard);
            res
        }))
    }

    /// Convert, waiting at most `convert_timeout` (including the wait for a free slot).
    /// On `TimedOut` the work goes on and `dst` appears when it is done. With
    /// `keep_wav = false` the source is deleted after a conversion that finished in time.
    pub async fn convert(&self, src: &Path, dst: &Path) -> Result<ConvertReport, RecordError> {
        let handle = self.start(src, dst)?;
        let report = match tokio::time::timeout(self.inner.timeout, handle).await {
            Ok(Ok(res)) => res?,
            Ok(Err(join)) => {
                return Err(RecordError::Worker {
                    path: src.to_path_buf(),
                    detail: join.to_string(),
                });
            }
            Err(_) => {
                tracing::warn!(src = %src.display(), timeout = ?self.inner.timeout,
                    "conversion still running after the timeout; using the original meanwhile");
                return Err(RecordError::TimedOut {
                    path: src.to_path_buf(),
                    after: self.inner.timeout,
                });
            }
        };
        if !self.inner.keep_wav {
            match tokio::fs::remove_file(src).await {
                Ok(()) => {
                    tracing::info!(src = %src.display(), "wav deleted after conversion ([records] keep_wav = false)")
                }
                Err(e) => tracing::warn!(src = %src.display(), error = %e,
                    "could not delete the wav after conversion: give kolokol write access to the spool or set keep_wav = true"),
            }
        }
        Ok(report)
    }
}
