//! wav → mp3 conversion: every fixture recording and every supported format/rate/channel
//! combination converts, and decoding the mp3 back gives the same length and the same
//! waveform. Damaged and unsupported files fail with a clear error and leave nothing behind.

use std::f64::consts::PI;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kolokol::records::{ConvertSettings, Converter, RecordError, RecordsConfig, convert_file};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/recordings");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wav"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixture recordings in {}", dir.display());
    v
}

/// Decode any file symphonia reads (wav, or mp3 with the LAME tag's gapless trimming) to
/// mono f32 in [-1, 1]. Returns (samples, sample rate).
fn decode_mono(path: &Path) -> (Vec<f32>, u32) {
    let mss = MediaSourceStream::new(Box::new(File::open(path).unwrap()), Default::default());
    let mut hint = Hint::new();
    if let Some(e) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(e);
    }
    let opts = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &opts, &MetadataOptions::default())
        .unwrap();
    let mut reader = probed.format;
    let track = reader
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .unwrap()
        .clone();
    let mut dec = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .unwrap();
    let mut out = Vec::new();
    let mut rate = track.codec_params.sample_rate.unwrap_or(0);
    loop {
        let pkt = match reader.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let buf = dec.decode(&pkt).unwrap();
        let spec = *buf.spec();
        rate = spec.rate;
        let ch = spec.channels.count();
        if buf.frames() == 0 {
            continue;
        }
        let mut sb = SampleBuffer::<f32>::new(buf.capacity() as u64, spec);
        sb.copy_interleaved_ref(buf);
        out.extend(
            sb.samples()
                .chunks_exact(ch)
                .map(|f| f.iter().sum::<f32>() / ch as f32),
        );
    }
    (out, rate)
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

/// Best normalized correlation of `b` against `a` over lags in ±max_lag, computed on a
/// window from the middle (the codec may shift the signal by a few samples).
fn best_correlation(a: &[f32], b: &[f32], max_lag: usize) -> f64 {
    let n = a.len().min(b.len());
    let win = (n / 2).min(6000);
    let start = (n - win) / 2;
    let x = &a[start..start + win];
    let mut best = -1.0f64;
    for lag in -(max_lag as i64)..=(max_lag as i64) {
        let s = start as i64 + lag;
        if s < 0 || (s as usize + win) > b.len() {
            continue;
        }
        let y = &b[s as usize..s as usize + win];
        let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
        for (&p, &q) in x.iter().zip(y) {
            let (p, q) = (f64::from(p), f64::from(q));
            xy += p * q;
            xx += p * p;
            yy += q * q;
        }
        if xx > 0.0 && yy > 0.0 {
            best = best.max(xy / (xx * yy).sqrt());
        }
    }
    best
}

/// Deterministic white noise (xorshift), for checking that the metric rejects unrelated
/// audio.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn every_fixture_recording_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    for src in fixtures() {
        let dst = tmp
            .path()
            .join(src.file_stem().unwrap())
            .with_extension("mp3");
        let before = std::fs::read(&src).unwrap();
        let report = convert_file(&src, &dst, &ConvertSettings::default()).unwrap();
        assert_eq!(report.codec, "pcm_s16le");
        assert_eq!((report.sample_rate, report.channels), (8000, 1));
        assert_eq!(std::fs::read(&src).unwrap(), before, "source changed");

        let (orig, orig_rate) = decode_mono(&src);
        let (mp3, mp3_rate) = decode_mono(&dst);
        assert_eq!(orig_rate, 8000);
        assert_eq!(mp3_rate, 8000, "8 kHz voice stays 8 kHz");
        let d_orig = orig.len() as f64 / f64::from(orig_rate);
        let d_mp3 = mp3.len() as f64 / f64::from(mp3_rate);
        assert!(
            (d_mp3 - d_orig).abs() / d_orig < 0.01,
            "{}: duration {d_orig:.3}s → {d_mp3:.3}s",
            src.display()
        );
        assert!((report.duration.as_secs_f64() - d_orig).abs() < 1e-3);

        // Not silence: the mp3 keeps most of the energy.
        let (ro, rm) = (rms(&orig), rms(&mp3));
        assert!(ro > 0.01, "fixture itself is silent?");
        assert!(rm > 0.5 * ro && rm < 1.5 * ro, "rms {ro:.4} → {rm:.4}");
        // Same waveform, and the metric does reject unrelated audio.
        let c = best_correlation(&orig, &mp3, 600);
        assert!(c > 0.9, "{}: correlation {c:.3}", src.display());
        let c_noise = best_correlation(&orig, &noise(orig.len(), 7), 50);
        assert!(c_noise < 0.2, "metric accepts noise: {c_noise:.3}");

        // 32 kbit/s CBR: 4 KB per second of audio, give or take the tag frame.
        let expected = d_orig * 4000.0;
        assert!(
            (report.bytes_out as f64) < expected * 1.15 + 1000.0,
            "{} bytes for {d_orig:.1}s",
            report.bytes_out
        );
        assert_eq!(report.bytes_out, std::fs::metadata(&dst).unwrap().len());
    }
    // Only the mp3s: no temp files left.
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(name.ends_with(".mp3") && !name.starts_with('.'), "{name}");
    }
}

// ---- a small WAV writer for the synthesized inputs ----

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fmt {
    Pcm8,
    Pcm16,
    MuLaw,
    ALaw,
}

/// G.711 µ-law encoder (the reference algorithm).
fn mulaw(s: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32635;
    let mut v = i32::from(s);
    let sign = if v < 0 { 0x80 } else { 0 };
    if v < 0 {
        v = -v;
    }
    v = v.min(CLIP) + BIAS;
    let mut exp = 7;
    let mut mask = 0x4000;
    while exp > 0 && v & mask == 0 {
        exp -= 1;
        mask >>= 1;
    }
    let mant = (v >> (exp + 3)) & 0x0F;
    !(sign | (exp << 4) | mant) as u8
}

/// G.711 A-law encoder.
fn alaw(s: i16) -> u8 {
    let mut v = i32::from(s) >> 3; // 13-bit
    let sign = if v >= 0 { 0x80 } else { 0 };
    if v < 0 {
        v = -v - 1;
    }
    let seg = match v {
        0..=31 => 0,
        32..=63 => 1,
        64..=127 => 2,
        128..=255 => 3,
        256..=511 => 4,
        512..=1023 => 5,
        1024..=2047 => 6,
        _ => 7,
    };
    let v = v.min(4095);
    let mant = if seg < 2 {
        (v >> 1) & 0x0F
    } else {
        (v >> seg) & 0x0F
    };
    ((sign | (seg << 4) | mant) ^ 0x55) as u8
}

/// RIFF/WAVE bytes with one fmt chunk and one data chunk.
fn wav_bytes(fmt: Fmt, rate: u32, channels: u16, frames: &[Vec<i16>]) -> Vec<u8> {
    let (tag, bits, fmt_len): (u16, u16, u32) = match fmt {
        Fmt::Pcm8 => (1, 8, 16),
        Fmt::Pcm16 => (1, 16, 16),
        Fmt::ALaw => (6, 8, 18),
        Fmt::MuLaw => (7, 8, 18),
    };
    let bps = u32::from(bits / 8);
    let mut data = Vec::new();
    for f in frames {
        for &s in f {
            match fmt {
                Fmt::Pcm8 => data.push(((i32::from(s) >> 8) + 128) as u8),
                Fmt::Pcm16 => data.extend_from_slice(&s.to_le_bytes()),
                Fmt::MuLaw => data.push(mulaw(s)),
                Fmt::ALaw => data.push(alaw(s)),
            }
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(4 + 8 + fmt_len + 8 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&fmt_len.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * bps * u32::from(channels)).to_le_bytes());
    out.extend_from_slice(&((bps as u16) * channels).to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    if fmt_len == 18 {
        out.extend_from_slice(&0u16.to_le_bytes());
    }
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    out
}

/// A voice-like test signal: two tones under a 3 Hz amplitude envelope, different per
/// channel so a stereo downmix is actually exercised.
fn signal(t: f64, ch: usize) -> f64 {
    let env = 0.55 + 0.45 * (2.0 * PI * 3.0 * t).sin();
    let (f1, f2) = if ch == 0 {
        (440.0, 1000.0)
    } else {
        (660.0, 1500.0)
    };
    0.5 * env * (0.6 * (2.0 * PI * f1 * t).sin() + 0.4 * (2.0 * PI * f2 * t).sin())
}

fn synth_frames(rate: u32, channels: u16, seconds: f64) -> Vec<Vec<i16>> {
    let n = (f64::from(rate) * seconds) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            (0..channels as usize)
                .map(|c| (signal(t, c) * 32767.0) as i16)
                .collect()
        })
        .collect()
}

/// The downmixed reference at any rate, computed from the formula.
fn reference(rate: u32, channels: u16, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let sum: f64 = (0..channels as usize).map(|c| signal(t, c)).sum();
            (sum / f64::from(channels)) as f32
        })
        .collect()
}

#[test]
fn every_format_rate_and_channel_count_converts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for fmt in [Fmt::Pcm8, Fmt::Pcm16, Fmt::MuLaw, Fmt::ALaw] {
        for rate in [8000u32, 16000, 44100, 48000] {
            for channels in [1u16, 2] {
                let name = format!("{fmt:?}-{rate}-{channels}");
                let src = tmp.path().join(format!("{name}.wav"));
                std::fs::write(
                    &src,
                    wav_bytes(fmt, rate, channels, &synth_frames(rate, channels, 1.0)),
                )
                .unwrap();
                let dst = tmp.path().join(format!("{name}.mp3"));
                let report = convert_file(&src, &dst, &ConvertSettings::default())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(report.channels, channels as usize, "{name}");
                assert_eq!(report.out_channels, 1, "{name}: downmixed by default");
                assert_eq!(report.frames, u64::from(rate), "{name}");

                let (mp3, mp3_rate) = decode_mono(&dst);
                let d = mp3.len() as f64 / f64::from(mp3_rate);
                assert!((d - 1.0).abs() < 0.01, "{name}: {d:.4}s at {mp3_rate} Hz");
                let want = reference(mp3_rate, channels, mp3.len());
                let r = rms(&mp3) / rms(&want);
                assert!(r > 0.6 && r < 1.4, "{name}: level ratio {r:.3}");
                let c = best_correlation(&want, &mp3, 300);
                assert!(c > 0.85, "{name}: correlation {c:.3}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 32);
}

#[test]
fn stereo_can_be_kept_and_bitrate_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("st.wav");
    std::fs::write(
        &src,
        wav_bytes(Fmt::Pcm16, 16000, 2, &synth_frames(16000, 2, 2.0)),
    )
    .unwrap();
    let dst = tmp.path().join("st.mp3");
    let settings = ConvertSettings {
        downmix: false,
        bitrate_kbps: 64,
        ..ConvertSettings::default()
    };
    let report = convert_file(&src, &dst, &settings).unwrap();
    assert_eq!(report.out_channels, 2);
    // 64 kbit/s for 2 s = 16000 bytes (+ the tag frame and the flush).
    assert!(
        (15_000..19_000).contains(&report.bytes_out),
        "{}",
        report.bytes_out
    );
    let (mp3, rate) = decode_mono(&dst);
    assert!((mp3.len() as f64 / f64::from(rate) - 2.0).abs() < 0.02);

    // An invalid bitrate is a config error before any work.
    let bad = ConvertSettings {
        bitrate_kbps: 33,
        ..ConvertSettings::default()
    };
    let err = convert_file(&src, &tmp.path().join("bad.mp3"), &bad).unwrap_err();
    assert!(
        matches!(
            err,
            RecordError::Config {
                key: "bitrate_kbps",
                ..
            }
        ),
        "{err}"
    );
    assert!(!tmp.path().join("bad.mp3").exists());
}

/// A GSM 6.10 wav header (format tag 0x31), as some PBXes write `.WAV` files.
fn gsm_wav() -> Vec<u8> {
    let frames = 50; // 65-byte blocks of 320 samples = 2 s
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(4 + 8 + 20 + 8 + 65 * frames as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&20u32.to_le_bytes());
    out.extend_from_slice(&0x31u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&8000u32.to_le_bytes());
    out.extend_from_slice(&1625u32.to_le_bytes());
    out.extend_from_slice(&65u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&320u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(65 * frames as u32).to_le_bytes());
    out.extend(std::iter::repeat_n(0x5Au8, 65 * frames));
    out
}

#[test]
fn damaged_and_unsupported_files_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = std::fs::read(&fixtures()[0]).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.wav", Vec::new()),
        ("half.wav", fixture[..fixture.len() / 2].to_vec()),
        ("header-only.wav", fixture[..30].to_vec()),
        ("text.wav", b"this is not audio at all\n".repeat(100)),
        ("gsm.wav", gsm_wav()),
        // Raw GSM frames (.gsm, 33-byte frames starting with 0xD_): no container at all.
        ("call.gsm", [0xD8u8; 33].repeat(100)),
    ];
    for (name, bytes) in cases {
        let src = tmp.path().join(name);
        std::fs::write(&src, &bytes).unwrap();
        let dst = tmp.path().join(format!("{name}.mp3"));
        let err = convert_file(&src, &dst, &ConvertSettings::default()).unwrap_err();
        let ok = match name {
            "empty.wav" => matches!(err, RecordError::Empty { .. }),
            "half.wav" => matches!(
                err,
                RecordError::Truncated { expected: 32000, decoded, .. } if decoded < 32000
            ),
            "header-only.wav" => matches!(err, RecordError::Corrupt { .. }),
            "text.wav" | "call.gsm" | "gsm.wav" => matches!(err, RecordError::Unsupported { .. }),
            _ => unreachable!(),
        };
        assert!(ok, "{name}: unexpected error {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(name),
            "{name}: message does not name the file: {msg}"
        );
        assert!(!dst.exists(), "{name}: mp3 written");
        assert_eq!(
            std::fs::read(&src).unwrap(),
            bytes,
            "{name}: original changed"
        );
    }
    // No temp files left behind.
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(!n.starts_with('.'), "temp file left: {n}");
    }
    // Too large for the configured limit.
    let src = tmp.path().join("big.wav");
    std::fs::write(&src, &fixture).unwrap();
    let tiny = ConvertSettings {
        max_file_bytes: 1000,
        ..ConvertSettings::default()
    };
    let err = convert_file(&src, &tmp.path().join("big.mp3"), &tiny).unwrap_err();
    assert!(matches!(err, RecordError::TooLarge { .. }), "{err:?}");
}

#[test]
fn existing_mp3_is_replaced_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("x.mp3");
    std::fs::write(&dst, b"old").unwrap();
    // A failed conversion leaves the old file alone...
    let bad = tmp.path().join("bad.wav");
    std::fs::write(&bad, b"nope").unwrap();
    assert!(convert_file(&bad, &dst, &ConvertSettings::default()).is_err());
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    // ...a good one replaces it.
    convert_file(&fixtures()[0], &dst, &ConvertSettings::default()).unwrap();
    assert!(std::fs::metadata(&dst).unwrap().len() > 1000);
}

fn long_wav(dir: &Path, name: &str, seconds: u32) -> PathBuf {
    let p = dir.join(name);
    let rate = 8000u32;
    let n = (rate * seconds) as usize;
    let mut bytes = wav_bytes(Fmt::Pcm16, rate, 1, &[]);
    let data_len = (n * 2) as u32;
    bytes[4..8].copy_from_slice(&(36 + data_len).to_le_bytes());
    bytes[40..44].copy_from_slice(&data_len.to_le_bytes());
    bytes.reserve(n * 2);
    for i in 0..n {
        let s = (signal(i as f64 / 8000.0, 0) * 30000.0) as i16;
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(&p, bytes).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converter_times_out_and_finishes_later() {
    let tmp = tempfile::tempdir().unwrap();
    let slow = long_wav(tmp.path(), "slow.wav", 60);
    let quick = fixtures()[0].clone();
    let cfg = RecordsConfig {
        max_concurrent: 1,
        convert_timeout: Duration::from_millis(1),
        ..RecordsConfig::default()
    };
    let conv = Converter::new(&cfg).unwrap();
    assert_eq!(conv.slots(), 1);

    // The only slot is busy with a one-minute file: the next caller times out at once and
    // uses the original, but its mp3 still appears later.
    let slow_job = conv.start(&slow, &tmp.path().join("slow.mp3")).unwrap();
    let dst = tmp.path().join("quick.mp3");
    let err = conv.convert(&quick, &dst).await.unwrap_err();
    assert!(matches!(err, RecordError::TimedOut { .. }), "{err:?}");
    let report = slow_job.await.unwrap().unwrap();
    assert_eq!(report.duration, Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !dst.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "late mp3 never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(quick.exists(), "wav kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converter_bounds_queue_and_deletes_wav_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    let cfg = RecordsConfig {
        max_concurrent: 1000,
        max_queued: 1,
        keep_wav: false,
        ..RecordsConfig::default()
    };
    let conv = Converter::new(&cfg).unwrap();
    assert_eq!(conv.slots(), cores, "never more than the cores");

    // Fill every slot and the one queue place with long conversions: the next is refused.
    let mut jobs = Vec::new();
    for i in 0..=cores {
        let src = long_wav(tmp.path(), &format!("long{i}.wav"), 30);
        jobs.push(
            conv.start(&src, &tmp.path().join(format!("long{i}.mp3")))
                .unwrap(),
        );
    }
    let extra = tmp.path().join("extra.wav");
    std::fs::copy(&fixtures()[0], &extra).unwrap();
    let err = conv
        .start(&extra, &tmp.path().join("extra.mp3"))
        .unwrap_err();
    assert!(matches!(err, RecordError::Busy { .. }), "{err:?}");
    for j in jobs {
        j.await.unwrap().unwrap();
    }

    // keep_wav = false: a conversion that finished in time removes the wav.
    let wav = tmp.path().join("del.wav");
    std::fs::copy(&fixtures()[0], &wav).unwrap();
    conv.convert(&wav, &tmp.path().join("del.mp3"))
        .await
        .unwrap();
    assert!(!wav.exists(), "wav kept despite keep_wav = false");
    assert!(tmp.path().join("del.mp3").exists());

    // A failed conversion never deletes the original.
    let bad = tmp.path().join("bad.wav");
    std::fs::write(&bad, b"garbage").unwrap();
    assert!(
        conv.convert(&bad, &tmp.path().join("bad.mp3"))
            .await
            .is_err()
    );
    assert!(bad.exists());
}
