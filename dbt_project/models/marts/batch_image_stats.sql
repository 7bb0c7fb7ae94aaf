-- Per-image statistics keyed by batch: the distributions drift monitoring compares.
-- Unlabeled images are included: drift needs no labels.
select
    batch_id,
    image_id,
    split,
    label,
    captured_at,
    brightness,
    contrast,
    ink_fraction,
    edge_strength,
    centroid_x,
    centroid_y,
    orientation
from {{ ref('int_images') }}
