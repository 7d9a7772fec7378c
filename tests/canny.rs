//! The built-in canny edge detector against OpenCV: tests/fixtures/canny holds crops of real
//! photographs (scikit-image's sample data) and `cv2.Canny(image, low, high)` of each, made by
//! onnx/make_controlnet_goldens.py. Every photo and threshold pair must agree on at least 99% of
//! pixels (the README quotes the measured agreement).

mod common;

use sdxl_worker::engine::canny::canny_mask;
use sdxl_worker::engine::control_image::ControlImage;

const MIN_AGREEMENT: f64 = 0.99;

#[derive(serde::Deserialize)]
struct Manifest {
    photos: Vec<Photo>,
}

#[derive(serde::Deserialize)]
struct Photo {
    name: String,
    image: String,
    edges: std::collections::BTreeMap<String, String>,
}

fn read_gray(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!(frame.color_type, png::ColorType::Grayscale);
    buf.truncate(frame.buffer_size());
    (frame.width, frame.height, buf)
}

#[test]
fn canny_agrees_with_opencv_on_real_photographs() {
    let dir = common::fixtures().join("canny");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.photos.len() >= 5, "at least five photographs");
    let mut failures = Vec::new();
    for photo in &manifest.photos {
        let (w, h, rgb) = common::read_png_rgb(&dir.join(&photo.image));
        let image = ControlImage::new(w, h, rgb).unwrap();
        for (thresholds, file) in &photo.edges {
            let (low, high) = thresholds.split_once(',').unwrap();
            let (low, high): (u32, u32) = (low.parse().unwrap(), high.parse().unwrap());
            let (ew, eh, expected) = read_gray(&dir.join(file));
            assert_eq!((ew, eh), (w, h));
            let mask = canny_mask(&image, low, high);
            let same = mask
                .iter()
                .zip(&expected)
                .filter(|(m, e)| **m == (**e > 127))
                .count();
            let agreement = same as f64 / mask.len() as f64;
            let edges = expected.iter().filter(|&&e| e > 127).count();
            eprintln!(
                "{:<10} canny({low}, {high}): {:.4}% agreement, {edges} OpenCV edge pixels",
                photo.name,
                agreement * 100.0
            );
            assert!(edges > 200, "{}: the photo has edges", photo.name);
            if agreement < MIN_AGREEMENT {
                failures.push(format!("{} ({low}, {high}): {agreement:.4}", photo.name));
            }
        }
    }
    assert!(failures.is_empty(), "below 99%: {failures:?}");
}
