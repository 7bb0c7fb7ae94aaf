{% test label_in_classes(model, column_name) %}
-- Labels are indices of the project's classes (the `classes` table ingestion keeps).
select {{ column_name }}
from {{ model }}
where {{ column_name }} not in (select class_index from {{ source('flywheel', 'classes') }})
{% endtest %}

{% test split_has_minimum_rows(model) %}
-- Every split needs enough labeled rows to train, select and test a model on.
with expected as (
    select 'train' as split
    union all select 'val'
    union all select 'test'
),
counts as (
    select split, count(*) as row_count from {{ model }} group by split
)
select expected.split, coalesce(counts.row_count, 0) as row_count
from expected
left join counts using (split)
where coalesce(counts.row_count, 0) < {{ var('min_rows_per_split') }}
{% endtest %}

{% test every_class_in_split(model, split) %}
-- Every class has at least one labeled example in the split (a model cannot learn a class it never saw).
with classes as (
    select class_index as label from {{ source('flywheel', 'classes') }}
)
select classes.label
from classes
left join (select distinct label from {{ model }} where split = '{{ split }}') as present using (label)
where present.label is null
{% endtest %}
